"""RunProgress and collective_failures (training/progress.py): a failed collective becomes one line naming the
step, the phase and the checkpoint a rerun resumes from; other errors pass unchanged. The real hang (a stopped
rank under torchrun) is tests/distributed/test_hung_rank.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdpg_scale.errors import RankLostError
from fdpg_scale.training.config import load_config
from fdpg_scale.distributed.launch import is_collective_failure
from fdpg_scale.training.progress import RunProgress, collective_failures
from fdpg_scale.training.timing import PhaseTimer

GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "5000ms for recv operation to complete")
SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def test_the_line_names_step_phase_timeout_and_checkpoint():
    progress, timer = RunProgress(), PhaseTimer()
    progress.last_checkpoint = Path("/runs/x/checkpoints/step_00000010")
    progress.at("optimizer step", 12, detail=lambda: timer.current)
    with pytest.raises(RankLostError) as caught, collective_failures(progress, timeout_s=5):
        with timer.phase("generation"):
            raise RuntimeError(GLOO_TIMEOUT)
    text = str(caught.value)
    assert text.startswith("a collective failed at step 12 (phase: generation): another rank stopped answering "
                           "for distributed.timeout_s=5 s or died (Timed out waiting 5000ms"), text
    assert text.endswith("a rerun resumes from step_00000010") and "\n" not in text and "unbound_buffer" not in text


def test_between_timed_phases_the_loop_phase_is_named_and_before_any_step_start_up():
    progress, timer = RunProgress(), PhaseTimer()
    assert progress.describe() == "start-up (phase: start-up)"
    progress.at("resume")
    assert progress.describe() == "start-up (phase: resume)"
    progress.at("optimizer step", 3, detail=lambda: timer.current)
    with timer.phase("backward"):
        assert progress.describe() == "step 3 (phase: backward)"
    assert progress.describe() == "step 3 (phase: optimizer step)" and timer.current is None
    with pytest.raises(RuntimeError), timer.phase("generation"), timer.phase("scoring"):
        raise RuntimeError("x")
    assert progress.describe() == "step 3 (phase: scoring)"   # where the error struck, innermost
    progress.at("checkpoint save")
    assert progress.describe() == "step 3 (phase: checkpoint save)"


@pytest.mark.parametrize("err", [RuntimeError(GLOO_TIMEOUT), RuntimeError("Application timeout caused pair closure"),
                                 RuntimeError("[pair.cc:598] Connection closed by peer [127.0.0.1]:1234"),
                                 torch.distributed.DistBackendError("NCCL communicator was aborted")])
def test_collective_failures_are_recognised(err):
    assert is_collective_failure(err)
    with pytest.raises(RankLostError, match="no checkpoint was written by this run yet"), \
            collective_failures(RunProgress(), timeout_s=600):
        raise err


@pytest.mark.parametrize("err", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("x"),
                                 KeyError("Timed out waiting")])
def test_other_errors_pass_unchanged(err):
    assert not is_collective_failure(err)
    with pytest.raises(type(err)) as caught, collective_failures(RunProgress(), timeout_s=600):
        raise err
    assert caught.value is err


def test_timeout_key_default_and_override():
    assert load_config(SMOKE).distributed.timeout_s == 600
    assert load_config(SMOKE, ["distributed.timeout_s=5"]).distributed.timeout_s == 5.0
