"""PhaseTimer synchronises the device around every phase on a GPU, and never on the CPU."""

from __future__ import annotations

import time

import pytest
import torch

from fdpg_scale.training.timing import PhaseTimer


def test_sync_brackets_each_phase_and_the_queued_work_is_credited_to_it():
    # A fake device whose queued work (0.05 s) only finishes at the next synchronisation: the phase that
    # launched it must be the one that pays for it.
    events: list[str] = []
    queued = []

    def sync():
        events.append("sync")
        while queued:
            time.sleep(queued.pop())

    timer = PhaseTimer(sync=sync)
    with timer.phase("backward"):
        events.append("work")
        queued.append(0.05)          # an asynchronous launch: returns at once
    with timer.phase("scoring"):
        events.append("work")
    assert events == ["sync", "work", "sync", "sync", "work", "sync"]
    assert timer.seconds["backward"] >= 0.05
    assert timer.seconds["scoring"] < 0.05
    assert timer.as_metrics().keys() == {"time/backward", "time/scoring"}


def test_sync_also_runs_when_the_phase_raises():
    calls = []
    timer = PhaseTimer(sync=lambda: calls.append(1))
    with pytest.raises(RuntimeError):
        with timer.phase("generation"):
            raise RuntimeError("boom")
    assert len(calls) == 2 and "generation" in timer.seconds


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_no_synchronisation_off_the_gpu(device, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize called for a CPU timer")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    timer = PhaseTimer(device)
    with timer.phase("logprobs"):
        pass
    assert timer.total >= 0.0


def test_a_cuda_device_synchronises_that_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: seen.append(dev))
    timer = PhaseTimer("cuda:1")
    with timer.phase("backward"):
        pass
    assert seen == [torch.device("cuda:1")] * 2
