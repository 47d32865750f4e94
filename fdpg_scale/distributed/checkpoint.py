"""Save and resume a run: engines, trainer state, every rank's RNG; atomic, rotated, fingerprinted.

Layout under ``<output_dir>/checkpoints/``::

    step_00000012/
        policy/ds/...            DeepSpeed checkpoint of the policy (ZeRO-3 shards, optimizer, LR scheduler)
        proposal/rank_00000.pt   each rank's own shard of the proposal q (when q is a separate engine)
        rng/rank_00000.pt        python, numpy, torch and accelerator RNG states of each rank
        hf/                      config + tokenizer files of the model (no weights), for export
        trainer_state.pt         the caller's dict (step, log Z, baseline, proposal version, λ, ...)
        meta.json                step, world size, fingerprint (written last before the commit)
    latest                       the name of the newest committed checkpoint

Atomicity: everything is written into ``.tmp-step_...`` beside the final directory; after a barrier rank 0
renames it into place (one rename: a directory named ``step_*`` is complete), then replaces ``latest``
(written to a temporary file + ``os.replace``), then deletes the oldest beyond ``keep``. A process killed at
any point leaves the previous checkpoint loadable; ``find_latest`` also survives a ``latest`` that points at
nothing by scanning for the newest ``step_*`` directory.

The fingerprint (e.g. model config hash, divergence name and α) is stored and compared on resume: resuming a
run with another model or divergence is refused with a one-line error naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fdpg_scale.distributed.launch import barrier, get_rank, get_world_size, is_rank0
from fdpg_scale.errors import CheckpointMismatchError  # defined with the other user errors; re-exported here

__all__ = ["CheckpointMismatchError", "save_checkpoint", "load_checkpoint", "find_latest", "check_fingerprint",
           "model_config_hash", "checkpoints_dir"]

_STEP_RE = re.compile(r"^step_(\d{8})$")
_DS_TAG = "ds"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def model_config_hash(model_dir: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a HF directory's config.json, key order ignored: the model's identity."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _step_dirs(ckdir: Path) -> list[tuple[int, Path]]:
    if not ckdir.is_dir():
        return []
    found = []
    for p in ckdir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None if it has none."""
    ckdir = checkpoints_dir(output_dir)
    pointer = ckdir / "latest"
    if pointer.is_file():
        target = ckdir / pointer.read_text().strip()
        if _STEP_RE.match(target.name) and (target / "meta.json").is_file():
            return target
    dirs = _step_dirs(ckdir)
    return dirs[-1][1] if dirs else None


def check_fingerprint(ckpt_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
    """Raise CheckpointMismatchError (one line, naming each differing key) unless ``fingerprint`` matches."""
    stored = json.loads((Path(ckpt_dir) / "meta.json").read_text())["fingerprint"]
    here = json.loads(json.dumps(dict(fingerprint)))  # same JSON normalisation as what was stored
    diffs = [f"{k}={stored.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(stored) | set(here))
             if stored.get(k) != here.get(k)]
    if diffs:
        raise CheckpointMismatchError(f"refusing to resume {ckpt_dir}: it was made with a different setup "
                                      f"({'; '.join(diffs)})")


def _rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": accel.get_rng_state() if accel.device_name() != "cpu" else None}


def _set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["accelerator"] is not None:
        get_accelerator().set_rng_state(state["accelerator"])


def _shard_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's own shard of every parameter (plus the full data of the ones ZeRO keeps whole)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    out = {}
    for name, p in engine.module.named_parameters():
        entry = {"shard": p.ds_tensor.detach().cpu().clone()}
        if p.ds_status == ZeroParamStatus.AVAILABLE:
            entry["full"] = p.detach().cpu().clone()
        out[name] = entry
    return out


@torch.no_grad()
def _load_shard_state(engine, state: Mapping[str, Mapping[str, torch.Tensor]], where: Path) -> None:
    params = dict(engine.module.named_parameters())
    if set(params) != set(state):
        raise CheckpointMismatchError(f"{where}: parameter names differ from this engine's")
    for name, p in params.items():
        shard = state[name]["shard"]
        if shard.shape != p.ds_tensor.shape:
            raise CheckpointMismatchError(f"{where}: {name} shard {tuple(shard.shape)} != this rank's "
                                          f"{tuple(p.ds_tensor.shape)}")
        p.ds_tensor.copy_(shard)
        if "full" in state[name] and p.data.numel() == state[name]["full"].numel():
            p.data.copy_(state[name]["full"])


def _copy_model_meta(hf_model, dest: Path) -> None:
    """Config, generation config and tokenizer files (never weights) of the model the engine was loaded from."""
    dest.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(dest)
    src = Path(getattr(hf_model.config, "_name_or_path", "") or "")
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                    and f.name != "config.json":
                shutil.copy2(f, dest / f.name)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _commit(tmp: Path, final: Path, ckdir: Path) -> None:
    """Rank 0: rename the finished directory into place, then point ``latest`` at it (last)."""
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        trash = ckdir / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    pointer_tmp = ckdir / ".latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, ckdir / "latest")


def _rotate(ckdir: Path, keep: int, current: Path) -> None:
    for _, p in _step_dirs(ckdir)[:-keep]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.iterdir():  # leftovers of saves killed halfway
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, policy, proposal=None,
                    trainer_state: Mapping[str, Any], fingerprint: Mapping[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it); returns its final directory.

    policy: the policy engine (DeepSpeed checkpoint with optimizer and LR scheduler). proposal: the separate
    proposal engine, or None when q is π. trainer_state: picklable dict (tensors allowed), stored from rank 0.
    fingerprint: JSON-able dict compared on resume (``check_fingerprint``). keep: newest checkpoints kept.
    """
    if keep < 1:
        raise ValueError(f"keep must be ≥ 1, got {keep}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int ≥ 0, got {step!r}")
    json.dumps(dict(fingerprint))  # fail before writing anything if it is not JSON-able
    ckdir = checkpoints_dir(output_dir)
    final = ckdir / f"step_{step:08d}"
    tmp = ckdir / f".tmp-{final.name}"
    rank, world = get_rank(), get_world_size()
    if is_rank0():
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        if proposal is not None:
            (tmp / "proposal").mkdir()
    barrier()
    policy.save_checkpoint(str(tmp / "policy"), tag=_DS_TAG, save_latest=False)
    if proposal is not None:
        torch.save(_shard_state(proposal), tmp / "proposal" / f"rank_{rank:05d}.pt")
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    barrier()
    if is_rank0():
        _copy_model_meta(policy.module.hf_model, tmp / "hf")
        torch.save(dict(trainer_state), tmp / "trainer_state.pt")
        _write_json_atomic(tmp / "meta.json", {"step": step, "world_size": world, "has_proposal": proposal is not None,
                                               "fingerprint": dict(fingerprint)})
        _commit(tmp, final, ckdir)
        _rotate(ckdir, keep, final)
    barrier()
    return final


def load_checkpoint(ckpt_dir: str | os.PathLike, *, policy, proposal=None, fingerprint: Mapping[str, Any],
                    load_optimizer: bool = True) -> dict:
    """Restore engines, this rank's RNG states and return the trainer-state dict (collective).

    ckpt_dir: a directory ``find_latest`` returned. Raises CheckpointMismatchError if the fingerprint or the
    world size differs, or if a proposal is expected but was not saved (or the other way round).
    """
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    check_fingerprint(ckpt_dir, fingerprint)
    if meta["world_size"] != get_world_size():
        raise CheckpointMismatchError(f"refusing to resume {ckpt_dir}: saved by {meta['world_size']} ranks, this "
                                      f"run has {get_world_size()} (ZeRO-3 shards are per rank)")
    if meta["has_proposal"] != (proposal is not None):
        raise CheckpointMismatchError(f"{ckpt_dir}: has_proposal={meta['has_proposal']} there, "
                                      f"{proposal is not None} here (on-policy vs separate proposal)")
    path, _ = policy.load_checkpoint(str(ckpt_dir / "policy"), tag=_DS_TAG, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir / 'policy'}: DeepSpeed found no checkpoint with tag {_DS_TAG!r}")
    rank = get_rank()
    if proposal is not None:
        f = ckpt_dir / "proposal" / f"rank_{rank:05d}.pt"
        _load_shard_state(proposal, torch.load(f, map_location="cpu", weights_only=True), f)
    _set_rng_state(torch.load(ckpt_dir / "rng" / f"rank_{rank:05d}.pt", weights_only=False))
    return torch.load(ckpt_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
