"""Rank/world/rendezvous resolution from torchrun, SLURM or nothing (pure functions of env dicts)."""

from __future__ import annotations

import pytest

from fdpg_scale.distributed.launch import expand_hostlist, resolve_launch


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-[9-10]-ib", ["gpu-9-ib", "gpu-10-ib"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1]", "n[a-b]", "n[3-1]", "a,,b"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="nodelist"):
        expand_hostlist(bad)


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "x[1-2]"}
    info = resolve_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.source) == \
        (3, 4, 1, "h0", 1234, "torchrun")


def test_slurm_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]",
           "SLURM_JOB_ID": "123456"}
    info = resolve_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.source) == \
        (5, 8, 1, "gpu07", "slurm")
    assert info.master_port == 20000 + 123456 % 20000
    assert info.env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                          "MASTER_PORT": str(info.master_port)}
    assert resolve_launch({**env, "MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.1"}).master_port == 29999
    assert resolve_launch({**env, "MASTER_ADDR": "10.0.0.1"}).master_addr == "10.0.0.1"


def test_single_process_default():
    info = resolve_launch({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")
    assert 0 < info.master_port < 65536


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "not in"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}, "NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}, "SLURM_NTASKS"),
])
def test_bad_environments_are_named(env, match):
    with pytest.raises(ValueError, match=match):
        resolve_launch(env)


def test_device_index_wraps_the_local_rank_over_the_visible_gpus():
    from fdpg_scale.distributed.launch import device_index

    assert [device_index(r, 8) for r in (0, 7)] == [0, 7]
    assert [device_index(r, 1) for r in range(8)] == [0] * 8  # srun --gpus-per-task=1: one GPU visible per rank
    assert device_index(5, 2) == 1
    with pytest.raises(RuntimeError, match="no GPU is visible to this process \\(local rank 3\\)"):
        device_index(3, 0)
