"""LOCAL_RANK as DeepSpeed reads it: the index among this process's visible GPUs, never the raw SLURM local id.

DeepSpeed takes LOCAL_RANK as a device ordinal (init_process_group's device_id, zero.Init's set_device, the
engine's device). Under ``srun --gpus-per-task=1`` task 3 of a node sees one GPU, so LOCAL_RANK=3 would be
"invalid device ordinal". The device count is faked: the mapping is what ``init_distributed`` exports.
"""

from __future__ import annotations

import datetime
import os

import pytest

from fdpg_scale.distributed import launch

SRUN_TASK_3 = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "77",
               "SLURM_JOB_NODELIST": "gpu[01-02]"}


@pytest.mark.parametrize("visible, want", [(None, "3"), (1, "0"), (8, "3"), (2, "1")])
def test_env_maps_the_local_id_to_a_visible_device(visible, want):
    info = launch.resolve_launch(SRUN_TASK_3)
    assert info.local_rank == 3
    env = info.env(visible_gpus=visible)
    assert env["LOCAL_RANK"] == want
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("11", "16", "gpu01")


def test_env_with_no_visible_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        launch.resolve_launch(SRUN_TASK_3).env(visible_gpus=0)


class FakeCudaAccelerator:
    """The two questions init_distributed asks a CUDA accelerator, with a chosen device count."""

    def __init__(self, count: int):
        self.count, self.selected = count, []

    def device_name(self, index=None):
        return "cuda"

    def device_count(self):
        return self.count

    def set_device(self, index):
        if not 0 <= index < self.count:
            raise RuntimeError(f"invalid device ordinal {index}")
        self.selected.append(index)


@pytest.mark.parametrize("count, want", [(1, 0), (4, 3)])
def test_init_distributed_exports_the_device_index_deepspeed_uses(monkeypatch, count, want):
    import deepspeed
    import deepspeed.accelerator
    import torch

    accel = FakeCudaAccelerator(count)
    started = {}

    def fake_init(dist_backend, auto_mpi_discovery, timeout):
        # What DeepSpeed itself then does with LOCAL_RANK (deepspeed/comm/torch.py, partition_parameters.py).
        started["backend"], started["timeout"] = dist_backend, timeout
        accel.set_device(int(os.environ["LOCAL_RANK"]))

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    # No process group exists here for DeepSpeed's world-group clone to be made from: record the call instead.
    monkeypatch.setattr(launch, "_clone_world_group", lambda timeout: started.setdefault("clone_timeout", timeout))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    saved = dict(os.environ)
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update(SRUN_TASK_3)
        info = launch.init_distributed()
        exported = os.environ["LOCAL_RANK"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert info.local_rank == 3
    assert exported == str(want)
    assert accel.selected == [want, want]
    assert started["backend"] == "nccl"
    assert started["timeout"] == started["clone_timeout"] == datetime.timedelta(seconds=600)  # the default
