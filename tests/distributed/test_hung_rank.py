"""A rank that stops answering (SIGSTOP: alive, sockets open, silent) ends a 2-rank job within
``distributed.timeout_s`` plus a margin: the waiting rank prints one line naming the step and phase and exits
non-zero, torchrun ends the job non-zero, and the checkpoint the line names is the newest and intact.

torchrun SIGKILLs the stopped rank after its shutdown wait; the test sets that wait to 5 s instead of the default
30 s to stay short (the default also fits in the margin)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from fdpg_scale.distributed.checkpoint import find_latest, verify_checkpoint
from fdpg_scale.errors import EXIT_RANK_LOST
from tests.harness import load_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

chaos = load_script("scripts/chaos_soak.py")
TIMEOUT_S = 8
MARGIN_S = 60


def test_a_stopped_rank_ends_the_job_within_the_timeout_with_one_line(tiny_gpt2, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    launcher = chaos.start_training(out, [f"model.path={tiny_gpt2}", "train.steps=400", "train.save_every=2",
                                          f"distributed.timeout_s={TIMEOUT_S}"], log,
                                    launcher_args=("--shutdown-timeout=5",))
    try:
        end = time.monotonic() + 300
        while chaos.last_step(out / "metrics.jsonl") < 3 or find_latest(out) is None:
            assert launcher.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(chaos.rank_pids(launcher)[1], signal.SIGSTOP)
        stopped = time.monotonic()
        status = launcher.wait(timeout=TIMEOUT_S + MARGIN_S)  # torchrun ends the job by itself
        elapsed = time.monotonic() - stopped
    finally:
        chaos.end_job(launcher, grace_s=0)   # SIGKILL reaches a stopped process
    text = log.read_text()
    assert status != 0 and elapsed < TIMEOUT_S + MARGIN_S, (status, elapsed, text[-3000:])
    ours = [line for line in text.splitlines() if line.startswith("fdpg-scale:")]
    assert len(ours) == 1, text[-4000:]
    assert re.search(r"^fdpg-scale: a collective failed at step \d+ \(phase: [a-z_ -]+\): another rank stopped "
                     rf"answering for distributed.timeout_s={TIMEOUT_S} s", ours[0]), ours[0]
    assert "a rerun resumes from step_" in ours[0] and "Traceback" not in text.split(ours[0])[0], text[-4000:]
    assert re.search(rf"exitcode\s*:\s*{EXIT_RANK_LOST}\b", text), text[-3000:]  # torchrun's report of rank 0
    # the checkpoint the line names is the newest, and intact (resuming from one: test_chaos.py)
    last = find_latest(out)
    assert ours[0].endswith(f"a rerun resumes from {last.name}") and verify_checkpoint(last) is None, ours[0]
