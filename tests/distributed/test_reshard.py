"""reshard.py without DeepSpeed engines: the proposal's ZeRO-3 partitions cut from N saved ranks for M ranks,
and the universal-checkpoint conversion's marker and failure line. The real resume on another world size
(engines, Adam moments, DeepSpeed's conversion) is test_resume_world_size.py's."""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.distributed import reshard
from fdpg_scale.distributed.reshard import UNIVERSAL_PREFIX, reshard_proposal_state, universal_policy_dir
from fdpg_scale.errors import CheckpointError


class Param:
    """What ZeRO-3 leaves of a parameter on one rank: the full size (ds_numel) and this rank's partition
    (ds_tensor, ceil(numel / world) values, the last rank's padded)."""

    def __init__(self, numel: int, world: int):
        self.ds_numel = numel
        self.ds_tensor = torch.empty(math.ceil(numel / world))


class Engine:
    def __init__(self, shapes: dict[str, tuple[int, ...]], world: int):
        self.params = {name: Param(math.prod(shape), world) for name, shape in shapes.items()}
        self.module = self

    def named_parameters(self):
        return iter(self.params.items())


SHAPES = {"wte.weight": (5, 3), "ln.bias": (7,), "scalar": (1,)}
FULL = {name: torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 100 * i
        for i, (name, shape) in enumerate(SHAPES.items())}


def partition(world: int) -> list[dict]:
    """What N ranks save: per parameter, rank r's slice of the flat tensor padded to a multiple of N."""
    saved = []
    for rank in range(world):
        shards = {}
        for name, full in FULL.items():
            n = math.ceil(full.numel() / world)
            padded = torch.cat([full.flatten(), torch.zeros(n * world - full.numel())])
            shards[name] = {"shard": padded[rank * n:(rank + 1) * n].clone()}
        saved.append(shards)
    return saved


def reshard_for(saved: list[dict], world: int, monkeypatch) -> list[dict]:
    out = []
    for rank in range(world):
        monkeypatch.setattr(reshard, "get_rank", lambda rank=rank: rank)
        out.append(reshard_proposal_state(saved, Engine(SHAPES, world)))
    return out


@pytest.mark.parametrize("saved_world, world", [(1, 2), (2, 1), (2, 3), (3, 2), (4, 3), (2, 8)])
def test_partitions_cut_for_another_world_size_are_that_world_s_partitions(saved_world, world, monkeypatch):
    got = reshard_for(partition(saved_world), world, monkeypatch)
    want = partition(world)
    for rank in range(world):
        assert got[rank].keys() == FULL.keys()
        for name in FULL:
            assert torch.equal(got[rank][name]["shard"], want[rank][name]["shard"]), (rank, name)


def test_there_and_back_gives_the_saved_shards(monkeypatch):
    saved = partition(2)
    back = reshard_for(reshard_for(saved, 3, monkeypatch), 2, monkeypatch)
    assert all(torch.equal(back[r][n]["shard"], saved[r][n]["shard"]) for r in range(2) for n in FULL)


def test_a_full_copy_saved_beside_the_shards_is_kept(monkeypatch):
    saved = partition(2)
    saved[0]["ln.bias"]["full"] = FULL["ln.bias"]
    got = reshard_for(saved, 3, monkeypatch)
    assert all(torch.equal(got[r]["ln.bias"]["full"], FULL["ln.bias"]) for r in range(3))
    assert "full" not in got[0]["wte.weight"]


def test_a_parameter_missing_from_a_saved_rank_is_named(monkeypatch):
    saved = partition(2)
    del saved[1]["ln.bias"]
    with pytest.raises(CheckpointError, match="proposal parameter ln.bias is missing from the saved shards"):
        reshard_for(saved, 2, monkeypatch)


def test_saved_shards_too_small_for_the_parameter_are_named(monkeypatch):
    saved = partition(2)
    for rank in saved:
        rank["wte.weight"]["shard"] = rank["wte.weight"]["shard"][:3]
    with pytest.raises(CheckpointError, match="proposal parameter wte.weight: the saved shards hold 6 values, the "
                                              "parameter has 15"):
        reshard_for(saved, 3, monkeypatch)


def test_a_finished_conversion_is_reused(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    dest = tmp_path / "checkpoints" / f"{UNIVERSAL_PREFIX}step_00000004"
    (dest / "ds").mkdir(parents=True)
    (dest / "done").write_text("ok\n")       # written only after a whole conversion: nothing is redone
    assert universal_policy_dir(ckpt, "ds") == dest
    assert sorted(p.name for p in dest.iterdir()) == ["done", "ds"]


def test_a_failed_conversion_is_one_line_naming_the_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    (ckpt / "policy" / "ds").mkdir(parents=True)       # no DeepSpeed files in it
    with pytest.raises(CheckpointError) as info:
        universal_policy_dir(ckpt, "ds")
    text = str(info.value)
    assert text.startswith(f"{ckpt}: DeepSpeed's universal-checkpoint conversion failed (") and "\n" not in text
    assert not (tmp_path / "checkpoints" / f"{UNIVERSAL_PREFIX}step_00000004" / "done").exists()
