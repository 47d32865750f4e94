"""The grids (experiments/grid.py): the built-in ones, and grid files read by the run configs' typed loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fdpg_scale.errors import ConfigError
from fdpg_scale.experiments.grid import FULL, QUICK, SIZES, Grid, grid_runs, load_grid
from fdpg_scale.models.base_config import PretrainConfig
from fdpg_scale.training.config_loader import to_plain
from tests.helpers import grid_yaml, tiny_grid

ROOT = Path(__file__).resolve().parents[2]


def test_built_in_grids_span_tasks_sizes_and_seeds():
    """The full grid: every task at the middle size, three sizes ≥ 10× apart in parameters, ≥ 3 seeds, the
    four divergences; the quick grid: one size, two tasks, two seeds."""
    params = {s: _parameters(c) for s, c in SIZES.items()}
    sizes = list(SIZES)                                                  # smallest first
    assert all(params[a] < params[b] for a, b in zip(sizes, sizes[1:]))
    assert params[sizes[-1]] / params[sizes[0]] >= 10
    assert {c.stem for c, _ in FULL.cells} == {"pointwise-common", "pointwise-rare", "distributional", "reward",
                                               "conditional"}
    assert {s for _, s in FULL.cells} == set(SIZES) and len(FULL.seeds) >= 3
    assert set(FULL.divergences) >= {"kl", "rkl", "js", "tv"}
    assert len({s for _, s in QUICK.cells}) == 1 and len(QUICK.cells) == 2 and len(QUICK.seeds) == 2
    for config, _ in FULL.cells:
        assert (ROOT / config).is_file(), config
    assert len(grid_runs(FULL)) == len(FULL.cells) * len(FULL.divergences) * len(FULL.seeds)
    with pytest.raises(ValueError, match="unknown size"):
        Grid(name="bad", sizes={}, cells=((Path("x.yaml"), "huge"),))


def _parameters(cfg: PretrainConfig) -> int:
    """Parameters of the GPT-2 that pretrain-base builds from ``cfg`` (on the meta device: no memory)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, tie_word_embeddings=True, bos_token_id=0,
                        eos_token_id=1)
    with torch.device("meta"):
        return sum(p.numel() for p in GPT2LMHeadModel(config).parameters())


def test_runs_are_numbered_cell_then_divergence_then_seed(tmp_path):
    runs = grid_runs(QUICK)
    assert len(runs) == 16 and len(set(r.directory(tmp_path) for r in runs)) == 16
    assert [(r.task, r.divergence, r.seed) for r in runs[:3]] == [("pointwise-common", "kl", 0),
                                                                  ("pointwise-common", "kl", 1),
                                                                  ("pointwise-common", "rkl", 0)]
    assert runs[0].directory(tmp_path) == tmp_path / "runs/pointwise-common/tiny/kl/seed0"


def test_grid_file_round_trips(tmp_path, monkeypatch):
    """Every field written out (the miniature, the quick and the full grid; by the tests' helper, which writes
    sizes as a user does, and by the loader's own ``to_plain``) reads back to an equal Grid; a minimal file
    takes Grid's defaults, and a null size is the default PretrainConfig (the middle size)."""
    monkeypatch.chdir(ROOT)
    for grid in (tiny_grid(tmp_path), QUICK, FULL):
        for text in (grid_yaml(grid), yaml.safe_dump(to_plain(grid))):
            path = tmp_path / f"{grid.name}.yaml"
            path.write_text(text)
            assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(Grid)}
            assert load_grid(path) == grid
    path = tmp_path / "minimal.yaml"
    path.write_text("name: mine\n"
                    "sizes: {tiny: {n_layer: 2, n_embd: 32, steps: 20}, middle: }\n"
                    "cells:\n  - [configs/reproduce/reward.yaml, tiny]\n  - [configs/reproduce/reward.yaml, middle]\n"
                    "divergences: [js]\n")
    assert load_grid(path) == Grid(name="mine", sizes={"tiny": PretrainConfig(n_layer=2, n_embd=32, steps=20),
                                                       "middle": PretrainConfig()},
                                   cells=((Path("configs/reproduce/reward.yaml"), "tiny"),
                                          (Path("configs/reproduce/reward.yaml"), "middle")), divergences=("js",))


_DROP = object()
_VALID = {"name": "bad", "sizes": {"tiny": {"n_layer": 2}}, "cells": [["configs/reproduce/reward.yaml", "tiny"]]}


@pytest.mark.parametrize("change, message", [
    ({"seed": [0]}, "unknown config key 'seed' (valid in the top level: base_root, cells, corpus, divergences, "),
    ({"name": _DROP}, "missing required config key 'name'"),
    ({"sizes": {"tiny": {"n_layers": 2}}}, "unknown config key 'sizes.tiny.n_layers' (valid in sizes.tiny: "),
    ({"sizes": {"tiny": {"lr": "fast"}}}, "config key 'sizes.tiny.lr' must be of type float, got 'fast'"),
    ({"sizes": {"tiny": {"n_head": 3}}}, "sizes.tiny: n_head (3) must divide n_embd (128)"),
    ({"sizes": {1: {"n_head": 4}}}, "config key 'sizes: the key 1' must be of type str, got 1"),
    ({"steps": "2"}, "config key 'steps' must be of type int, got '2' (str)"),
    ({"seeds": [0, True]}, "config key 'seeds[1]' must be of type int, got True (bool)"),
    ({"divergences": "kl"}, "config key 'divergences' must be a list, got 'kl'"),
    ({"cells": [["configs/reproduce/nope.yaml", "tiny"]]},
     "cells[0]: task config not found: configs/reproduce/nope.yaml"),
    ({"cells": [["configs/reproduce/reward.yaml"]]}, "config key 'cells[0]' must be a list of 2 items (Path, str)"),
    ({"cells": [["configs/reproduce/reward.yaml", "huge"]]}, "names an unknown size (known: tiny)"),
    ({"overrides": ["train.global_batc=8"]}, "overrides: unknown config key 'train.global_batc'"),
    ({"corpus": "no/such/dir"}, "corpus: not a directory: no/such/dir"),
    ({"seeds": [0, 0]}, "seeds repeat an entry"),
])
def test_grid_file_errors_name_the_file_and_key(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in (_VALID | change).items() if v is not _DROP}))
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_grid_file_that_is_missing_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="^grid file not found: .*nope.yaml$"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=f"^{bad}: not valid YAML") as err:
        load_grid(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=f"^{bad}: the top level must be a mapping of Grid's keys, got list"):
        load_grid(bad)
