"""No NaN reaches a checkpoint: a scorer returning NaN (skip / stop) and an infinite learning rate, in real runs.

Each case is one 1-rank `fdpg-scale train` process (~30-60 s on 2 cores) started through
tests/distributed/workers/train_nonfinite.py, which adds the test-only ingredient and calls the real CLI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fdpg_scale.distributed.checkpoint_files import load_plain
from fdpg_scale.errors import EXIT_NONFINITE
from tests.harness import SMOKE, WORKERS, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _run(mode: str, out: Path, model: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return run_cli(mode, "--config", str(SMOKE), f"output_dir={out}", f"model.path={model}", "train.save_every=1",
                   "logging.progress_bar=false", "logging.tensorboard=false", *overrides,
                   script=WORKERS / "train_nonfinite.py", nproc=nproc, check=False)


def _finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return obj == obj and abs(obj) != float("inf")
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


NAN_SCORER = ["target.kind=reward", "target.scorer=nan_step_1", "target.scorer_args={}", "train.steps=3"]


def test_nan_scores_skip_the_step_and_every_checkpoint_is_finite(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    proc = _run("nan-step-1", out, tiny_gpt2, *NAN_SCORER, "train.on_nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1 skipped: its samples are not finite (scorer 'nan_step_1' returned nan for sample 0" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["skipped"] == 1 and rows[0]["loss"] is None and rows[0]["nonfinite_skips"] == 1
    for r in rows[1:]:
        assert r["nonfinite_skips"] == 1 and r["loss"] == r["loss"] and abs(r["log_z"]) < float("inf"), r
    for step in ("step_00000002", "step_00000003"):
        ckpt = out / "checkpoints" / step
        for name in ("trainer_state.pt", "proposal/rank_00000.pt"):
            assert _finite(load_plain(ckpt / name)), (step, name)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step_00000003" / "policy"), tag="ds")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_nan_scores_on_one_rank_skip_the_step_on_both(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    proc = _run("nan-step-1-rank-1", out, tiny_gpt2, *NAN_SCORER, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1 skipped: its samples are not finite (rank 1: scorer 'nan_step_1'" in proc.stdout, proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in rows] == [1, 0, 0] and rows[-1]["nonfinite_skips"] == 1


def test_nan_scores_stop_the_run_in_one_line_under_on_nonfinite_stop(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    proc = _run("nan-step-1", out, tiny_gpt2, *NAN_SCORER, "train.on_nonfinite=stop")
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-4000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fdpg-scale:")]
    assert len(ours) == 1 and "step 1: its samples are not finite" in ours[0] and "'stop'" in ours[0], ours
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("checkpoints/step_*"))


def test_an_infinite_learning_rate_stops_before_a_poisoned_checkpoint(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    proc = _run("lr-inf", out, tiny_gpt2, "train.steps=3")
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-4000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fdpg-scale:")]
    assert len(ours) == 1 and "step 1: the policy's weights are not finite" in ours[0], ours
    assert "train.lr=inf" in ours[0] and "Traceback" not in proc.stderr
    assert not list(out.glob("checkpoints/step_*"))
