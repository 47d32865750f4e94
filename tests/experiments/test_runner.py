"""Running a grid (experiments/runner.py and the ``reproduce`` command): run numbering on the command line,
workers, and the quick mode's code path (``run_grid``) end to end on a tiny base with a tiny budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import fdpg_scale.experiments.runner as runner
from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.errors import ConfigError
from fdpg_scale.experiments.grid import QUICK, Grid, grid_runs
from fdpg_scale.experiments.runner import run_grid
from fdpg_scale.experiments.stats import METRICS
from fdpg_scale.experiments.verdicts import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE
from fdpg_scale.models.base_config import PretrainConfig
from tests.helpers import grid_yaml, tiny_grid

ROOT = Path(__file__).resolve().parents[2]


def test_cli_counts_runs_and_rejects_a_run_outside_the_grid(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["reproduce", "--quick", "--count"]) == 0
    assert capsys.readouterr().out.strip() == str(len(grid_runs(QUICK))) == "16"
    assert cli_main(["reproduce", "--quick", "--out", "unused", "--cell", "16"]) == 2
    assert capsys.readouterr().err.strip() == ("fdpg-scale: config error: --cell 16 is outside the quick grid's "
                                               "runs 0..15")


def test_cli_grid_file_counts_its_runs_and_excludes_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "grid.yaml"
    path.write_text(grid_yaml(dataclasses.replace(tiny_grid(tmp_path), seeds=(0, 1, 2))))
    assert cli_main(["reproduce", "--grid", str(path), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"                    # 1 cell × kl, js × 3 seeds
    path.write_text("name: bad\nsizes: {tiny: {}}\ncells: [[configs/reproduce/reward.yaml, tiny]]\nsead: [0]\n")
    assert cli_main(["reproduce", "--grid", str(path), "--count"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fdpg-scale: config error: {path}: unknown config key 'sead'") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["reproduce", "--quick", "--grid", str(path), "--count"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_reproduce_help_states_what_quick_costs_and_where_runs_go(capsys):
    with pytest.raises(SystemExit):
        cli_main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the tiny base" in text and "417 s" in text and "worker processes" in text
    assert "small base" not in text and "everything runs in this process" not in text


def test_workers_need_a_grid_a_child_can_rebuild(tmp_path):
    grid = Grid(name="t", sizes={"tiny": PretrainConfig()}, cells=((Path("configs/reproduce/reward.yaml"), "tiny"),))
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        run_grid(grid, tmp_path, command="test", workers=0)
    with pytest.raises(ValueError, match="workers > 1 needs grid_args"):
        run_grid(grid, tmp_path, command="test", workers=2)


def test_default_workers_is_one_per_usable_core_capped(monkeypatch):
    for cores, expected in ((1, 1), (2, 2), (64, runner.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(runner, "usable_cores", lambda cores=cores: cores)
        assert runner.default_workers() == expected


def test_train_command_is_the_users_command():
    """One rank: ``python -m fdpg_scale.cli train``; several: torchrun --standalone; an α-divergence's α."""
    cmd = runner._train_command(Path("c.yaml"), Path("out/x"), "alpha:0.5", 1, ["train.steps=2"])
    assert cmd[1:] == ["-m", "fdpg_scale.cli", "train", "--config", "c.yaml", "output_dir=out/x",
                       "divergence.name=alpha", "logging.progress_bar=false", "train.steps=2", "divergence.alpha=0.5"]
    cmd = runner._train_command(Path("c.yaml"), Path("out/x"), "js", 2, [])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]


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
