"""``fdpg-scale reproduce``: the verdict rules on synthetic numbers, the t-interval, the grids, grid files
(``--grid``), and the quick mode's code path (``run_grid``) end to end on a tiny base with a tiny budget."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from fdpg_scale.apps.reproduce import (DOES_NOT_HOLD, FULL, HOLDS, INCONCLUSIVE, METRICS, QUICK, SIZES, Grid,
                                       _settling, claim_verdicts, grid_runs, load_grid, run_grid, summarize,
                                       t_interval)
from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.errors import ConfigError
from fdpg_scale.models.base_config import PretrainConfig
from tests.helpers import grid_yaml, tiny_grid

ROOT = Path(__file__).resolve().parents[1]


def _cells(spec: dict) -> list[dict]:
    """Synthetic finished runs: spec {(task, size): {divergence: [KL(p‖π) per seed]}}; other metrics fixed."""
    cells = []
    for (task, size), divs in spec.items():
        for div, values in divs.items():
            for seed, v in enumerate(values):
                row = {k: 0.5 for k, _ in METRICS} | {"kl_p_pi": v}
                cells.append({"task": task, "size": size, "divergence": div, "seed": seed, "policy": row,
                              "base": {k: 0.5 for k, _ in METRICS}})
    return cells


def _verdict(spec: dict, claim: int, sizes=("small", "large")) -> str:
    return claim_verdicts(summarize(_cells(spec)), list(sizes))[claim - 1]["verdict"]


LOW, HIGH, WIDE = [1.0, 1.1, 0.9], [3.0, 3.1, 2.9], [1.0, 2.0, 3.0]


def test_t_interval_matches_student_t():
    iv = t_interval([1.0, 2.0, 3.0])                       # sd 1, n 3: t(0.975, 2) = 4.3027
    assert iv["mean"] == 2.0 and math.isclose(iv["half"], 4.302652729749462 / math.sqrt(3), rel_tol=1e-9)
    assert iv["lo"] < 2.0 < iv["hi"]
    assert t_interval([5.0])["half"] is None                # one seed: no interval, never "clearly" anything


def test_claim1_verdicts():
    two_winners = {("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "small"): {"kl": HIGH, "js": LOW}}
    assert _verdict(two_winners, 1) == HOLDS
    one_winner = {("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "small"): {"kl": LOW, "js": HIGH}}
    assert _verdict(one_winner, 1) == DOES_NOT_HOLD
    overlapping = {("a", "small"): {"kl": WIDE, "js": [1.5, 2.5, 3.5]}, ("b", "small"): {"kl": LOW, "js": HIGH}}
    assert _verdict(overlapping, 1) == INCONCLUSIVE


def test_claim2_verdicts():
    assert _verdict({("a", "small"): {"kl": HIGH, "js": LOW}}, 2) == HOLDS                 # js/kl = 1/3, clear
    narrow = {("a", "small"): {"kl": [2.0, 2.01, 1.99], "js": [1.8, 1.81, 1.79]}}          # clear, but js/kl = 0.9
    assert _verdict(narrow, 2) == INCONCLUSIVE
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 2) == DOES_NOT_HOLD
    assert _verdict({("a", "small"): {"kl": WIDE, "rkl": LOW}}, 2) == INCONCLUSIVE         # no js: nothing to compare


def test_claim3_verdicts():
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 3) == INCONCLUSIVE          # one size only
    persists = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": HIGH, "js": LOW}}
    assert _verdict(persists, 3) == HOLDS
    vanishes = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": WIDE, "js": [1.5, 2.5, 3.5]}}
    assert _verdict(vanishes, 3) == DOES_NOT_HOLD
    # The size order decides which end is "largest": reversed, the same numbers say the differences appear.
    assert _verdict(vanishes, 3, sizes=("large", "small")) == HOLDS


def test_settling_line_compares_last_change_with_the_interval():
    cells = _cells({("a", "small"): {"kl": LOW, "js": HIGH}})
    for c in cells:   # kl moves by -0.01 over its last interval (within its ±0.25), js by -1.0 (beyond ±0.25)
        last = c["policy"]["kl_p_pi"]
        c["curve"] = [{"kl_p_pi": 9.0}, {"kl_p_pi": last + (0.01 if c["divergence"] == "kl" else 1.0)},
                      {"kl_p_pi": last}]
    line = _settling(cells, summarize(cells)["a"]["small"])
    assert "kl -0.010 (within ±0.248)" in line and "js -1.000 (beyond ±0.248)" in line


def test_cli_counts_runs_and_rejects_a_run_outside_the_grid(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["reproduce", "--quick", "--count"]) == 0
    assert capsys.readouterr().out.strip() == str(len(grid_runs(QUICK))) == "16"
    assert cli_main(["reproduce", "--quick", "--out", "unused", "--cell", "16"]) == 2
    assert capsys.readouterr().err.strip() == ("fdpg-scale: config error: --cell 16 is outside the quick grid's "
                                               "runs 0..15")


def test_grids_meet_the_issue():
    params = {s: _parameters(c) for s, c in SIZES.items()}
    sizes = list(SIZES)                                                  # smallest first
    assert all(params[a] < params[b] for a, b in zip(sizes, sizes[1:]))
    assert params[sizes[-1]] / params[sizes[0]] >= 10                   # sizes span ≥ 10× in parameters
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


@pytest.mark.slow
def test_quick_code_path_writes_report_and_results(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    grid = tiny_grid(tmp_path)   # 4 training processes, 8 evaluations
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_yaml(grid))
    out = tmp_path / "out"
    # --workers 2: the runs go two at a time, each a `reproduce --grid FILE --cell I` process (a SLURM task)
    report = run_grid(grid, out, command="test", workers=2, grid_args=["--grid", str(grid_file)])
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"cell_{i}.log" for i in range(4)]
    results = json.loads((out / "results.json").read_text())

    assert [v["claim"] for v in results["verdicts"]] == [1, 2, 3]
    assert all(v["verdict"] in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE) for v in results["verdicts"])
    assert results["verdicts"][2]["verdict"] == INCONCLUSIVE              # one size: claim 3 cannot be decided
    base = results["bases"]["tiny"]
    assert base["parameters"] > 0 and base["model_ppl"] > 0 and base["unigram_ppl"] > 0
    row = results["summary"]["pointwise-common"]["tiny"]
    for div in ("kl", "js"):
        for key, _ in METRICS:
            iv = row["divergences"][div][key]
            assert iv["n"] == 2 and iv["lo"] <= iv["mean"] <= iv["hi"], (div, key, iv)
    assert len(results["runs"]) == 4
    for cell in results["runs"]:
        assert [p["samples"] for p in cell["curve"]] == [0, 8, 16]      # the base, then each checkpoint
        assert cell["curve"][-1]["kl_p_pi"] == cell["policy"]["kl_p_pi"]
        assert cell["curve"][0]["alignment"] == cell["base"]["alignment"]
    text = report.read_text()
    assert "## Verdicts" in text and "**Claim 3: inconclusive.**" in text
    assert "| f-DPG kl |" in text and "| f-DPG js |" in text and "| tiny |" in text
    for png in ("pointwise-common-tiny_curves.png", "pointwise-common-tiny_frontier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in text
    # A second call finds every run done (cell.json) and only rewrites the report.
    before = (out / grid_runs(grid)[0].directory(out) / "cell.json").stat().st_mtime
    run_grid(grid, out, command="test")
    assert (grid_runs(grid)[0].directory(out) / "cell.json").stat().st_mtime == before
    # ... but a grid with other settings (a quick run's directory given to the full grid) is refused.
    with pytest.raises(ConfigError, match="was run with .*choose another --out"):
        run_grid(dataclasses.replace(grid, steps=4), out, command="test")


# ------------------------------------------------------------------------------------------ grid files
def test_grid_file_round_trips(tmp_path, monkeypatch):
    """Every field written out (the miniature, the quick and the full grid) reads back to an equal Grid; a
    minimal file takes Grid's defaults, and a null size is the default PretrainConfig (the middle size)."""
    monkeypatch.chdir(ROOT)
    for grid in (tiny_grid(tmp_path), QUICK, FULL):
        path = tmp_path / f"{grid.name}.yaml"
        path.write_text(grid_yaml(grid))
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
    ({"seed": [0]}, "unknown key 'seed' (valid: name, sizes, cells, divergences, seeds, "),
    ({"name": _DROP}, "missing key 'name'"),
    ({"sizes": {"tiny": {"n_layers": 2}}}, "unknown config key 'sizes.tiny.n_layers' (valid in sizes.tiny: "),
    ({"sizes": {"tiny": {"lr": "fast"}}}, "config key 'sizes.tiny.lr' must be of type float, got 'fast'"),
    ({"sizes": {"tiny": {"n_head": 3}}}, "sizes.tiny: n_head (3) must divide n_embd (128)"),
    ({"steps": "2"}, "steps must be an integer, got '2' (str)"),
    ({"seeds": [0, True]}, "seeds[1] must be an integer, got True (bool)"),
    ({"divergences": "kl"}, "divergences must be a list, got 'kl' (str)"),
    ({"cells": [["configs/reproduce/nope.yaml", "tiny"]]},
     "cells[0]: task config not found: configs/reproduce/nope.yaml"),
    ({"cells": [["configs/reproduce/reward.yaml"]]}, "cells[0] must be a [task config file, size name] pair"),
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


def test_cli_grid_file_counts_its_runs_and_excludes_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "grid.yaml"
    path.write_text(grid_yaml(dataclasses.replace(tiny_grid(tmp_path), seeds=(0, 1, 2))))
    assert cli_main(["reproduce", "--grid", str(path), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"                    # 1 cell × kl, js × 3 seeds
    path.write_text("name: bad\nsizes: {tiny: {}}\ncells: [[configs/reproduce/reward.yaml, tiny]]\nsead: [0]\n")
    assert cli_main(["reproduce", "--grid", str(path), "--count"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fdpg-scale: config error: {path}: unknown key 'sead'") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["reproduce", "--quick", "--grid", str(path), "--count"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_workers_need_a_grid_a_child_can_rebuild(tmp_path):
    grid = Grid(name="t", sizes={"tiny": PretrainConfig()}, cells=((Path("configs/reproduce/reward.yaml"), "tiny"),))
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        run_grid(grid, tmp_path, command="test", workers=0)
    with pytest.raises(ValueError, match="workers > 1 needs grid_args"):
        run_grid(grid, tmp_path, command="test", workers=2)


def test_size_table_puts_sizes_in_order_with_their_parameters():
    from fdpg_scale.apps.reproduce import _size_table

    summary = summarize(_cells({("a", "large"): {"kl": LOW, "js": HIGH}, ("a", "small"): {"kl": HIGH, "js": LOW}}))
    bases = {"small": {"parameters": 100_000}, "large": {"parameters": 2_000_000}}
    lines = _size_table(summary["a"], ["small", "large"], bases).splitlines()
    assert lines[0] == "| model | small (0.10 M) | large (2.00 M) |"
    kl_row = next(line for line in lines if line.startswith("| f-DPG kl |"))
    assert kl_row.index("3.000") < kl_row.index("1.000")        # small's mean (HIGH) first, then large's (LOW)


def test_default_workers_is_one_per_usable_core_capped(monkeypatch):
    import fdpg_scale.apps.reproduce as reproduce

    for cores, expected in ((1, 1), (2, 2), (64, reproduce.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(reproduce, "usable_cores", lambda cores=cores: cores)
        assert reproduce.default_workers() == expected
