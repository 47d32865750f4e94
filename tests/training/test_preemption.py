"""PreemptionSignal (training/preemption.py): SIGUSR1 and SIGTERM set the flag, and a signal that reached one
rank stops every rank at the same step boundary (two forked gloo ranks). The real requeue under SLURM is
tests/slurm/test_slurm_jobs.py's."""

from __future__ import annotations

import os
import signal

import pytest

from fdpg_scale.training.preemption import SIGNALS, PreemptionSignal
from tests.harness import run_ranks


@pytest.fixture
def restore_handlers():
    """Put back this process's handlers of the stop signals after the test."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_no_signal_no_stop():
    flag = PreemptionSignal()
    assert flag.name is None and not flag.requested()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_sets_the_flag_and_nothing_else(sig, restore_handlers):
    flag = PreemptionSignal.install()
    assert not flag.requested()
    os.kill(os.getpid(), sig)          # the handler only records it: this process goes on
    assert flag.name == signal.Signals(sig).name and flag.requested()


def _signal_rank_0(rank: int) -> tuple[bool, bool, str | None]:
    flag = PreemptionSignal.install()
    before = flag.requested()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
    return before, flag.requested(), flag.name


def test_a_signal_on_one_rank_is_seen_by_every_rank():
    (before0, after0, name0), (before1, after1, name1) = run_ranks(_signal_rank_0, 2)
    assert not before0 and not before1
    assert after0 and after1                      # the all-reduced flag: both ranks stop at this step
    assert name0 == "SIGUSR1" and name1 is None   # only rank 0 received it
