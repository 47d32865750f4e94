"""Resume a checkpoint saved by N ranks on M ranks: a requeued or continued cluster job often gets another node count.

- **The policy** (weights, fp32 master, Adam moments, LR scheduler): ZeRO-3 saves per-rank flat partitions,
  which only the same world size can read. DeepSpeed's universal checkpoint conversion
  (``deepspeed.checkpoint.ds_to_universal``) rewrites them as one file per parameter and state (full tensors,
  world-size free), and ``engine.load_checkpoint`` with ``checkpoint.load_universal`` re-partitions them for
  the current world. The conversion runs once, on rank 0, into ``checkpoints/.universal-step_*`` beside the
  checkpoint (removed by the next save's clean-up); the checkpoint itself is never modified.
- **The proposal** q (the project's own per-rank shards, see checkpoint.py): ZeRO-3 partitions each parameter
  as its flattened tensor padded to a multiple of the world size and cut into equal slices, rank r holding
  slice r. So concatenating the N saved slices in rank order gives the padded flat tensor, from which each of
  the M ranks cuts its own slice: done here directly, with no conversion.
- **The RNG states**: rank r restores the state saved by rank r mod N. No draw of the trainer depends on these
  streams (every chunk is sampled with a seed derived from the run seed, the step and the chunk index, the
  same on any world size), so the resumed run draws exactly what the uninterrupted one would have.
- **The trainer state** (log Z, baseline, proposal schedule, λ) is global, saved once: nothing to do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import Mapping

import torch

from fdpg_scale.distributed.launch import barrier, get_rank, is_rank0
from fdpg_scale.errors import CheckpointError

__all__ = ["universal_policy_dir", "load_policy_resharded", "reshard_proposal_state"]

UNIVERSAL_PREFIX = ".universal-"


def universal_policy_dir(ckpt_dir: Path, tag: str) -> Path:
    """Convert ``ckpt_dir/policy/<tag>`` to a universal checkpoint once (rank 0; collective) and return the
    directory to pass to ``engine.load_checkpoint`` (it holds ``<tag>/``)."""
    from deepspeed.checkpoint import ds_to_universal

    dest = ckpt_dir.parent / f"{UNIVERSAL_PREFIX}{ckpt_dir.name}"
    done = dest / "done"
    if is_rank0() and not done.is_file():
        shutil.rmtree(dest, ignore_errors=True)
        (dest / tag).parent.mkdir(parents=True)
        args = argparse.Namespace(input_folder=str(ckpt_dir / "policy" / tag), output_folder=str(dest / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        chatter = io.StringIO()  # the converter narrates every file and draws progress bars; a failure is
        try:                     # reported instead, in one line
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
        except Exception as err:  # noqa: BLE001 - any converter failure becomes one line naming the checkpoint
            raise CheckpointError(f"{ckpt_dir}: DeepSpeed's universal-checkpoint conversion failed "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
        done.write_text("ok\n")
    barrier()
    return dest


def load_policy_resharded(policy, ckpt_dir: Path, tag: str, *, load_optimizer: bool) -> None:
    """Load the policy engine from a checkpoint saved on another world size (collective)."""
    load_dir = universal_policy_dir(ckpt_dir, tag)
    # DeepSpeed reads this flag from the engine's config at load time ("checkpoint": {"load_universal": true}
    # in a DeepSpeed JSON); it is set for this one call, since only a resume on another world size needs it.
    config = policy._config
    before = config.load_universal_checkpoint
    inner = policy.optimizer.optimizer  # the torch optimizer inside ZeRO-3's, stepping the flat fp32 partitions
    weight_decay = [group["weight_decay"] for group in inner.param_groups]
    config.load_universal_checkpoint = True
    try:
        path, _ = policy.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise CheckpointError(f"{load_dir}: DeepSpeed found no universal checkpoint with tag {tag!r}")
    # Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_checkpoint_dir_
    # stage3), undone here: (1) every parameter group gets group 0's hyperparameters, so the no-decay group
    # (biases, norms) would get the decay group's weight_decay; (2) every sub-group's state shares ONE 'step'
    # tensor, which torch's Adam increments in place once per sub-group per step, so the bias correction of
    # all but the first group runs ahead (measured: 1 → 2 ranks then differed from the straight run by 1e-3 in
    # the loss one step after the resume; with the fix they are bit-identical).
    for group, decay in zip(inner.param_groups, weight_decay):
        group["weight_decay"] = decay
    for flat in policy.optimizer.fp32_partitioned_groups_flat:
        state = inner.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def reshard_proposal_state(saved: list[Mapping[str, Mapping[str, torch.Tensor]]], engine) -> dict:
    """This rank's proposal shards (the ``{name: {"shard": ..., "full": ...}}`` of checkpoint.py) cut from the
    shards of all N saving ranks (``saved``, in rank order), for this engine's world size M."""
    rank = get_rank()
    out = {}
    for name, p in engine.module.named_parameters():
        if any(name not in s for s in saved):
            raise CheckpointError(f"proposal parameter {name} is missing from the saved shards")
        flat = torch.cat([s[name]["shard"].flatten() for s in saved])
        numel = p.ds_numel
        if flat.numel() < numel:
            raise CheckpointError(f"proposal parameter {name}: the saved shards hold {flat.numel()} values, the "
                                  f"parameter has {numel}")
        n = p.ds_tensor.numel()
        mine = torch.zeros(n, dtype=flat.dtype)
        lo, hi = min(rank * n, numel), min(rank * n + n, numel)
        mine[:hi - lo] = flat[lo:hi]
        entry = {"shard": mine.view(p.ds_tensor.shape)}
        if "full" in saved[0][name]:
            entry["full"] = saved[0][name]["full"]
        out[name] = entry
    return out
