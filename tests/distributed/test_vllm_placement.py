"""Where a rank's vLLM engine runs: its worker process sees only the rank's GPU (no GPU or vLLM needed: the
environment the worker is started with is a pure function of the device and CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import os

import pytest
import torch

from fdpg_scale.distributed.vllm_engine import _environment, worker_device_env


def test_cpu_and_no_device_leave_the_environment_alone():
    assert worker_device_env(None, "0,1") == {}
    assert worker_device_env(torch.device("cpu"), None) == {}


@pytest.mark.parametrize("index, visible, physical", [
    (0, None, "0"), (3, None, "3"),              # all GPUs visible: torch's index is the physical one
    (1, "4,5,6,7", "5"),                          # a SLURM allocation of GPUs 4-7: local index 1 is GPU 5
    (0, " 2 , 3 ", "2"),
    (1, "GPU-aaaa,GPU-bbbb", "GPU-bbbb"),         # UUIDs pass through
])
def test_worker_sees_only_the_ranks_gpu(index, visible, physical):
    assert worker_device_env(torch.device("cuda", index), visible) == {"CUDA_VISIBLE_DEVICES": physical}


def test_a_device_outside_the_visible_set_is_refused_by_name():
    with pytest.raises(ValueError, match=r"cuda:2 is not among CUDA_VISIBLE_DEVICES='4,5' \(2 visible\)"):
        worker_device_env(torch.device("cuda", 2), "4,5")
    with pytest.raises(ValueError, match="has no index"):
        worker_device_env(torch.device("cuda"), None)


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("FDPG_TEST_UNSET", raising=False)
    with _environment({"CUDA_VISIBLE_DEVICES": "1", "FDPG_TEST_UNSET": "x"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ["FDPG_TEST_UNSET"] == "x"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and "FDPG_TEST_UNSET" not in os.environ
    with pytest.raises(RuntimeError), _environment({"CUDA_VISIBLE_DEVICES": "1"}):
        raise RuntimeError("the engine failed to start")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
