"""The clone of the world group on which DeepSpeed's ZeRO collectives run gets ``distributed.timeout_s`` too
(launch._clone_world_group), not torch's 30-minute default: two forked gloo ranks, one that never joins."""

from __future__ import annotations

import datetime
import time

import pytest

from tests.harness import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _reduce_on_deepspeeds_world_clone(rank: int) -> tuple[bool, float]:
    import torch
    from deepspeed.utils import groups

    from fdpg_scale.distributed import launch

    groups._WORLD_GROUP = None
    launch._clone_world_group(datetime.timedelta(seconds=2))
    clone = groups._WORLD_GROUP   # what DeepSpeed's _clone_world_group hands ZeRO-3 once it is set
    if rank == 1:
        time.sleep(6)                             # never joins the collective
        return True, 0.0
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1), group=clone)
    except RuntimeError as err:
        return launch.is_collective_failure(err), time.monotonic() - start
    return False, time.monotonic() - start


def test_a_collective_on_deepspeeds_world_clone_times_out_after_the_run_timeout():
    (failed, waited), _ = run_ranks(_reduce_on_deepspeeds_world_clone, 2)
    assert failed and waited < 5, waited
