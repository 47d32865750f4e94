"""benchmarks/vs_disco.py's own logic, without disco (never installed by the tests): its arguments, the commands
that would build disco's environment, and the summary, table and figure from made-up run records; and
benchmarks/_disco_worker.py's token count, which runs in disco's environment and is importable without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vs_disco = _module("vs_disco")


def test_defaults_match_the_demo_budget():
    args = vs_disco.parse_args([])
    assert (args.steps, args.batch, args.lrs, args.seeds, args.divergences) == (60, 32, [3e-5], [0, 1, 2], ["kl", "js"])
    assert args.config == REPO / "configs" / "demo.yaml"
    assert vs_disco.save_steps(60, 2) == [30, 60]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "61", "--eval-points", "2"], "not a multiple of --eval-points"),
    (["--batch", "0"], "--batch and --threads must be >= 1"),
    (["--disco-source", "/nonexistent"], "has no disco/__init__.py"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        vs_disco.parse_args(argv)
    assert message in capsys.readouterr().err


def test_install_commands_pin_the_lock_and_skip_disco_dependencies(tmp_path):
    pypi = vs_disco.disco_install_commands(tmp_path / "env", "python3", None)
    assert pypi[0] == ["python3", "-m", "venv", str(tmp_path / "env")]
    assert str(REPO / "requirements" / "lock.txt") in pypi[1] and "torch" in pypi[1]
    assert pypi[2][-2:] == ["--ignore-requires-python", vs_disco.DISCO_PYPI] and "--no-deps" in pypi[2]
    local = vs_disco.disco_install_commands(tmp_path / "env", "python3", tmp_path / "disco")
    assert local[2][-1] == str(tmp_path / "disco") and "--no-deps" in local[2]


def _record(impl: str, divergence: str, seed: int, kl: float, tokens_per_s: float) -> dict:
    base = {"step": 0, "samples": 0, "kl_p_pi": 3.0, "kl_p_pi_se": 0.1, "alignment": 0.1, "kl_gain_rs": 0.0,
            "kl_gain_rs_se": 0.0}
    end = {"step": 60, "samples": 1920, "kl_p_pi": kl, "kl_p_pi_se": 0.1, "alignment": 0.5,
           "kl_gain_rs": 3.0 - kl, "kl_gain_rs_se": 0.1}
    return {"impl": impl, "divergence": divergence, "lr": 3e-5, "seed": seed, "steps": 60, "batch": 32,
            "curve": [base, end], "tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_s / 2,
            "process_seconds": 50.0}


def test_summary_pairs_seeds_and_judges_within_one_se(tmp_path):
    records = [_record("fdpg-scale", "kl", s, kl, 2000.0) for s, kl in enumerate([2.0, 2.2, 2.1])]
    records += [_record("disco", "kl", s, kl, 500.0) for s, kl in enumerate([2.0, 2.0, 2.0])]
    records += [_record("fdpg-scale", "js", s, kl, 900.0) for s, kl in enumerate([2.5, 2.6, 2.7])]
    records += [_record("disco", "js", s, kl, 1000.0) for s, kl in enumerate([2.0, 2.0, 2.0])]
    rows = {r["divergence"]: r for r in vs_disco.summarise(records)}
    kl, js = rows["kl"]["paired"], rows["js"]["paired"]
    assert kl["seeds"] == [0, 1, 2]
    assert kl["kl_diff"][0] == pytest.approx(0.1) and kl["kl_diff"][1] == pytest.approx(0.1 / math.sqrt(3))
    assert not kl["no_worse"]                                   # 0.1 above 0 with SE 0.058: worse beyond 1 SE
    assert kl["speedup"] == pytest.approx(4.0) and kl["faster"]
    assert not js["no_worse"] and not js["faster"]
    assert rows["kl"]["base_kl_p_pi"] == pytest.approx(3.0)
    # one seed more on disco's side only: not paired
    rows = vs_disco.summarise(records[:6] + [_record("disco", "kl", 3, 9.0, 500.0)])
    assert rows[0]["paired"]["seeds"] == [0, 1, 2] and rows[0]["disco"]["seeds"] == 4
    table = vs_disco.markdown(vs_disco.summarise(records))
    assert table.count("\n") == 2 + 4 - 1
    assert "| kl | 3e-05 | fdpg-scale | 3 | 2.100 ± 0.058 |" in table and "4.00× disco's tokens/s, 4.00× per CPU s" in table
    vs_disco.plot(records, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_summary_says_no_worse_when_within_one_se():
    records = [_record("fdpg-scale", "kl", s, kl, 2000.0) for s, kl in enumerate([1.9, 2.2, 2.0])]
    records += [_record("disco", "kl", s, 2.0, 500.0) for s in range(3)]
    (row,) = vs_disco.summarise(records)
    assert row["paired"]["kl_diff"][0] == pytest.approx(0.1 / 3) and row["paired"]["no_worse"]


def test_worker_counts_tokens_up_to_the_first_eos():
    worker = _module("_disco_worker")
    eos, pad = 2, 0
    assert worker.generated_tokens(torch.tensor([5, 6, 2, 0, 0]), eos, pad) == 3
    assert worker.generated_tokens(torch.tensor([5, 6, 7, 8]), eos, pad) == 4
    assert worker.generated_tokens(torch.tensor([2, 5, 2]), eos, pad) == 1


def test_report_only_reads_finished_runs_and_names_the_missing(tmp_path, capsys):
    out = tmp_path / "out"
    for record in (_record("fdpg-scale", "kl", 0, 2.0, 900.0), _record("disco", "kl", 0, 2.1, 600.0)):
        directory = vs_disco.run_dir(out, record["impl"], "kl", 3e-5, 0)
        directory.mkdir(parents=True)
        (directory / "run.json").write_text(json.dumps(record))
    assert vs_disco.main(["--report-only", "--divergences", "kl", "--seeds", "0", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "left out: fdpg-scale_kl_lr3e-05_s1, disco_kl_lr3e-05_s1" in printed
    assert "| kl | 3e-05 | disco | 1 | 2.100 |" in printed
    written = json.loads((out / "vs_disco.json").read_text())
    assert len(written["records"]) == 2 and written["rows"][0]["paired"]["seeds"] == [0]
    assert written["rows"][0]["paired"]["no_worse"] is None and "undecided (one paired seed" in printed
    assert (out / "vs_disco.png").is_file()
