"""scripts/gpu_check.sh and benchmarks/gpu_check.py on CPU: the --out layout, the summary rewritten after every
section, section limits and the total budget, the one-line no-GPU exit, and every section's code in a dry run.

Figures on CPU say nothing about a GPU: this checks that the one prepared command does what it promises, so
that a session with a GPU only has to run it (benchmarks/README.md, "GPU").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/gpu_check.sh"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID")}
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".cache/torch_extensions"),
               FDPG_PYTHON=sys.executable)
    return env


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_one_line_and_a_summary(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    # this machine's interpreter has a CPU torch: no GPU is visible; nothing is installed
    run = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path / "absent"), "--out", str(out), "--python",
                          sys.executable, "--venv", str(tmp_path / "venv")], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 120
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU visible" in lines[0] and str(out) in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["mode"] == "no GPU" and summary["sections"] == {}
    assert "no CUDA GPU visible" in (out / "summary.md").read_text()
    assert not (tmp_path / "venv").exists()


def test_bad_arguments_are_one_line(tmp_path):
    for args, needle in (([], "--out DIR is required"), (["--out", str(tmp_path), "--budget", "x"], "whole seconds"),
                         (["--bogus"], "unknown argument --bogus")):
        run = subprocess.run(["bash", str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and needle in run.stderr, run.stderr


def test_summary_after_every_section_limits_and_budget(tmp_path, monkeypatch):
    gc = _gpu_check_module()
    snapshots = []
    real_write = gc.write_summary

    def spy(out, report):
        real_write(out, report)
        on_disk = json.loads((out / "summary.json").read_text())
        snapshots.append([(name, sec["status"]) for name, sec in on_disk["sections"].items()])

    monkeypatch.setattr(gc, "write_summary", spy)
    monkeypatch.setattr(gc.os, "environ", _env())
    out = tmp_path / "out"
    out.mkdir()
    limits = dict(gc.SECTIONS, smoke_train=3)  # far too short for a training run: it is stopped at 3 s
    report = gc.run_sections(out, ["probe", "smoke_train", "dw_repeat", "timing"], dry_run=True, budget=200,
                             limits=limits, meta={"mode": "dry run (CPU)"})
    # written after each section, each time with one more section in it, then once more with the verdict
    assert [len(s) for s in snapshots[:4]] == [1, 2, 3, 4]
    statuses = dict(snapshots[-1])
    assert statuses == {"probe": "ok", "smoke_train": "timeout", "dw_repeat": "ok", "timing": "ok"}
    assert report["meta"]["verdict"] == "not ok: smoke_train"
    assert 3 <= report["sections"]["smoke_train"]["seconds"] < 30  # killed with its children at the limit
    assert sorted(p.name for p in (out / "sections").iterdir()) == sorted(
        ["probe.json", "probe.log", "smoke_train.log", "dw_repeat.json", "dw_repeat.log", "timing.json", "timing.log"])
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check (dry run (CPU)): not ok: smoke_train") and md.count("\n| ") == 5
    # a budget that runs out: the sections after it are recorded as not run, not silently dropped
    small = gc.run_sections(tmp_path, ["probe", "dw_repeat"], dry_run=True, budget=gc.MIN_SECONDS - 1,
                            limits=limits, meta={"mode": "dry run (CPU)"})
    assert [s["status"] for s in small["sections"].values()] == ["not run", "not run"]


def test_section_limits_fit_the_total_budget():
    gc = _gpu_check_module()
    assert gc.TOTAL_SECONDS == 540
    limits = dict(gc.SECTIONS)
    assert list(limits)[:6] == ["probe", "smoke_train", "srun_env", "padded_llama", "compiled_tests", "timing"]
    assert all(0 < s <= gc.TOTAL_SECONDS for s in limits.values())
    # the sections a first GPU run needs most fit the budget together, with the install's time
    assert sum(limits[n] for n in ("probe", "smoke_train", "srun_env", "padded_llama")) <= 540 - 120


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_every_section_through_the_script(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env=_env(), capture_output=True,
                         text=True, timeout=580)
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert run.returncode == 0, (run.stdout[-3000:], {k: v.get("error") or v.get("log_tail") for k, v in sections.items()})
    gc = _gpu_check_module()
    assert list(sections) == [n for n, _ in gc.SECTIONS]
    assert sections["compiled_tests"]["status"] == "skipped"
    assert sections["probe"]["deepspeed"] and sections["probe"]["default_atomic_sem"] == "acq_rel"
    assert sections["smoke_train"]["steps"] == 2 and sections["smoke_train"]["tokens_per_s_median"] > 0
    assert sections["srun_env"]["local_rank"] == "3"  # CPU: no GPU to map to (on a GPU: "0")
    assert sections["padded_llama"]["grads_finite"] and sections["padded_llama"]["padded_positions"] > 0
    assert {r["path"] for r in sections["timing"]["rows"]} == {"naive", "torch"}
    assert all(r["ok"] for r in sections["large_index"]["rows"])
    assert summary["meta"]["verdict"] == "all sections ok" and summary["meta"]["elapsed_s"] < 540


def test_a_timing_section_stopped_at_its_limit_keeps_its_rows(tmp_path, monkeypatch):
    gc = _gpu_check_module()
    monkeypatch.setattr(gc.os, "environ", _env())
    # the dry run's timing rows are written as they come; a limit that ends the section after its first rows
    # (the naive path at a shape big enough for a few seconds on CPU) keeps them with status timeout
    out = tmp_path / "out"
    (out / "sections").mkdir(parents=True)
    partial = out / "sections" / "timing.json"
    rows = gc._timing_rows([(64, 32, 1009)], "cpu", True, reps=1, partial=partial)
    saved = json.loads(partial.read_text())
    assert saved["status"] == "partial" and [r["path"] for r in saved["rows"]] == [r["path"] for r in rows]
