"""Save and resume a run: engines, trainer state, every rank's RNG; atomic, rotated, fingerprinted.

Layout under ``<output_dir>/checkpoints/``::

    step_00000012/
        policy/ds/...            DeepSpeed checkpoint of the policy (ZeRO-3 shards, optimizer, LR scheduler; with
                                 LoRA the trainable adapter only: the frozen base is model.path)
        proposal/rank_00000.pt   each rank's own shard of the proposal q (when q is a separate engine; with
                                 LoRA the "proposal" adapter's shards)
        lora/adapter_config.json with LoRA: PEFT's adapter config, naming the base model directory
        rng/rank_00000.pt        python, numpy, torch and accelerator RNG states of each rank
        hf/                      config + tokenizer files of the model (no weights), for export
        trainer_state.pt         the caller's dict (step, log Z, baseline, proposal version, λ, ...)
        meta.json                step, world size, fingerprint, size + sha256 of every other file (written last)
    latest                       the name of the newest committed checkpoint
    .damaged-step_00000015/      a checkpoint that failed verification on resume, kept for inspection
    .universal-step_00000012/    its policy converted for another world size (reshard.py), until the next save

Atomicity: everything is written into ``.tmp-step_...`` beside the final directory; after a barrier rank 0
renames it into place (one rename: a directory named ``step_*`` is complete), then replaces ``latest``
(written to a temporary file + ``os.replace``), then deletes the oldest beyond ``keep``. A process killed at
any point leaves the previous checkpoint loadable; ``find_latest`` also survives a ``latest`` that points at
nothing by scanning for the newest ``step_*`` directory.

The fingerprint (e.g. model config hash, divergence name and α) is stored and compared on resume: resuming a
run with another model or divergence is refused with a one-line error naming what differs.

Integrity: ``meta.json`` also records the size and sha256 of every other file (checkpoint_files.py).
``find_intact`` verifies checkpoints newest first before anything is loaded: a damaged one (truncated,
missing or altered file) is reported in one line and set aside as ``.damaged-step_*``, and the run resumes
from the newest intact one; if none is intact it stops with one line listing what it found. Rotation
renames a directory to ``.old-step_*`` before deleting it, so a kill halfway never leaves a partial
``step_*``; ``step_*`` directories without ``meta.json`` (left by older versions) are removed.
Anything else in ``checkpoints/`` (a stray file, a directory copied in by hand) is left alone and named in a
warning on resume, and so is a ``latest`` that names no checkpoint: the resume takes the newest intact
``step_*`` whatever ``latest`` says, and points ``latest`` at it.

Trust: the project's own files (proposal shards, RNG states, trainer state) hold tensors and plain
containers and load with ``weights_only=True``; a planted pickle is refused. DeepSpeed's files under
``policy/`` are read by DeepSpeed's loader, which unpickles: resume only from checkpoint directories you
trust, as you would only run code you trust.
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

from fdpg_scale.distributed.checkpoint_files import hash_files, load_plain, verify_files
from fdpg_scale.distributed.checkpoint_writes import SaveGuard
from fdpg_scale.distributed.reshard import UNIVERSAL_PREFIX, load_policy_resharded, reshard_proposal_state
from fdpg_scale.errors import CheckpointError
from fdpg_scale.distributed.launch import barrier, get_rank, get_world_size, is_rank0
from fdpg_scale.errors import CheckpointMismatchError  # defined with the other user errors; re-exported here

__all__ = ["CheckpointMismatchError", "CheckpointError", "save_checkpoint", "load_checkpoint", "find_latest",
           "verify_checkpoint",
           "find_intact", "check_fingerprint", "model_config_hash", "checkpoints_dir"]

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


def find_intact(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose files pass their size and sha256 check, or None if the run has none.

    Collective (every rank calls it; the hashing is shared out). Each damaged checkpoint newer than the one
    returned is reported in one line on rank 0 and renamed to ``.damaged-step_*`` (kept for inspection, never
    loaded or rotated). Raises CheckpointError (one line listing what was found) if checkpoints exist but none
    is intact. Also removes ``step_*`` directories without ``meta.json``: leftovers of a killed rotation.
    """
    ckdir = checkpoints_dir(output_dir)
    if is_rank0() and ckdir.is_dir():
        for p in ckdir.iterdir():
            if _STEP_RE.match(p.name) and p.is_dir() and not (p / "meta.json").exists():
                shutil.rmtree(p, ignore_errors=True)
        _warn_about_strangers(ckdir)
    barrier()
    found = []
    for _, d in reversed(_step_dirs(ckdir)):
        problem = verify_checkpoint(d)
        if problem is None:
            if is_rank0():
                _point_latest_at(ckdir, d)
            return d
        found.append(f"{d.name}: {problem}")
        if is_rank0():
            print(f"fdpg-scale: checkpoint {d} is damaged ({problem}); set aside as .damaged-{d.name}, trying the "
                  f"previous one", flush=True)
            shutil.rmtree(ckdir / f".damaged-{d.name}", ignore_errors=True)
            os.rename(d, ckdir / f".damaged-{d.name}")
        barrier()
    if found:
        raise CheckpointError(f"no intact checkpoint in {ckdir}: {'; '.join(found)} (move the directory away to "
                              f"start afresh)", every_rank=True)
    return None


#: What fdpg-scale itself writes in checkpoints/ besides step_* directories (see the module docstring).
_OWN_PREFIXES = (".tmp-", ".old-", ".damaged-", UNIVERSAL_PREFIX)
_OWN_NAMES = ("latest", ".latest.tmp")


def _point_latest_at(ckdir: Path, ckpt: Path) -> None:
    """Rank 0, on resume: make ``latest`` name the checkpoint the run resumes from when it names another (one set
    aside as damaged, one that is gone, an older one left by a kill between a save's rename and its pointer)."""
    pointer = ckdir / "latest"
    try:
        if pointer.is_file() and pointer.read_text().strip() == ckpt.name:
            return
        tmp = ckdir / ".latest.tmp"
        tmp.write_text(ckpt.name + "\n")
        os.replace(tmp, pointer)
    except (OSError, UnicodeDecodeError):
        pass  # the pointer is a convenience for readers: the resume never depends on it


def _warn_about_strangers(ckdir: Path) -> None:
    """Rank 0, on resume: one warning per entry of ``ckdir`` that fdpg-scale did not write (a stray file, a
    copied directory: never loaded, rotated or deleted), and for a ``latest`` that names no checkpoint (the
    resume takes the newest intact ``step_*`` whatever ``latest`` says; the next save rewrites it)."""
    for p in sorted(ckdir.iterdir()):
        ours = (_STEP_RE.match(p.name) and p.is_dir()) or p.name.startswith(_OWN_PREFIXES) or p.name in _OWN_NAMES
        if not ours:
            print(f"fdpg-scale: warning: {p} is not a checkpoint (fdpg-scale did not write it): ignored", flush=True)
    pointer = ckdir / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = "?"
        if not (_STEP_RE.match(name) and (ckdir / name / "meta.json").is_file()):
            print(f"fdpg-scale: warning: {pointer} names {name[:40]!r}, which is not a checkpoint here: ignored, "
                  f"resuming from the newest intact checkpoint", flush=True)


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """None if ``ckpt_dir`` is intact (every file at its recorded size and sha256), else the first problem in a
    few words. Collective when a process group is up; a single process (export, eval) checks every file."""
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError("not a checkpoint's meta.json")
    except (OSError, ValueError) as err:
        return f"meta.json unreadable ({type(err).__name__})"
    if "files" not in meta:
        # Saved before checksums were recorded: nothing to verify against. Loaded (refusing it would strand
        # every run made by an older version), and said so.
        if is_rank0():
            print(f"fdpg-scale: checkpoint {ckpt_dir} predates file checksums: loading it unverified", flush=True)
        return None
    return verify_files(ckpt_dir, meta["files"])


def check_fingerprint(ckpt_dir: str | os.PathLike, fingerprint: Mapping[str, Any],
                      defaults: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Raise CheckpointMismatchError (one line, naming each differing key) unless ``fingerprint`` matches.

    defaults: {entry: {key: default}} for entries that are dicts of settings (a config section): a key one side
    lacks counts as its default there, so a checkpoint written before a setting existed still resumes when the
    run leaves that setting at its default (and is refused when it does not)."""
    stored = json.loads((Path(ckpt_dir) / "meta.json").read_text())["fingerprint"]
    here = json.loads(json.dumps(dict(fingerprint)))  # same JSON normalisation as what was stored
    for entry, values in json.loads(json.dumps(dict(defaults or {}))).items():
        for side in (stored, here):
            if isinstance(side.get(entry), dict):
                side[entry] = {**values, **side[entry]}
    diffs = [f"{k}={stored.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(stored) | set(here))
             if stored.get(k) != here.get(k)]
    if diffs:
        raise CheckpointMismatchError(f"refusing to resume {ckpt_dir}: it was made with a different setup "
                                      f"({'; '.join(diffs)})")


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain containers (loadable with weights_only=True)."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "accelerator": accel.get_rng_state() if accel.device_name() != "cpu" else None}


def _set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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
            # Renamed first (atomic): a kill during the deletion leaves a hidden .old-* (removed below by the
            # next save), never a partial step_* that a resume could pick.
            old = ckdir / f".old-{p.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(p, old)
            shutil.rmtree(old, ignore_errors=True)
    for p in ckdir.iterdir():  # leftovers of saves killed halfway
        if p.name.startswith((".tmp-", ".old-", UNIVERSAL_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, policy, proposal=None,
                    trainer_state: Mapping[str, Any], fingerprint: Mapping[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it); returns its final directory.

    policy: the policy engine (DeepSpeed checkpoint with optimizer and LR scheduler). proposal: the separate
    proposal engine, or None when q is π. trainer_state: dict of tensors and plain
    containers (read back with weights_only=True), stored from rank 0.
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
    dirs = _step_dirs(ckdir)
    # Every write goes through the guard: a full disk on any rank ends the save on all of them in one line, the
    # unfinished directory removed, the previous checkpoint and `latest` untouched (checkpoint_writes.py).
    guard = SaveGuard(tmp, previous=dirs[-1][1] if dirs else None)
    if is_rank0():
        with guard.writing("the checkpoint's directories"):
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
            (tmp / "policy" / _DS_TAG).mkdir(parents=True)  # so that DeepSpeed's own makedirs write nothing
            if proposal is not None:
                (tmp / "proposal").mkdir()
    guard.agree()
    adapters = getattr(policy.module, "adapters", None)
    # LoRA: the frozen base is the model directory itself; only the adapters and their optimizer state are saved.
    with guard.writing("policy/ (DeepSpeed's shards)"):
        policy.save_checkpoint(str(tmp / "policy"), tag=_DS_TAG, save_latest=False,
                               exclude_frozen_parameters=adapters is not None)
    if guard.failed:
        barrier()  # the one DeepSpeed's save ends with, where the ranks whose writes succeeded are waiting
    if proposal is not None and not guard.failed:
        with guard.writing(f"proposal/rank_{rank:05d}.pt"):
            torch.save(_shard_state(proposal), tmp / "proposal" / f"rank_{rank:05d}.pt")
    if not guard.failed:
        with guard.writing(f"rng/rank_{rank:05d}.pt"):
            torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    guard.agree()
    if is_rank0():
        with guard.writing("hf/, lora/ and trainer_state.pt"):
            _copy_model_meta(policy.module.hf_model, tmp / "hf")
            if adapters is not None:  # what export needs to rebuild the adapter on its base (PEFT's adapter_config)
                base = Path(getattr(policy.module.hf_model.config, "_name_or_path", "")).resolve()
                adapters.config(str(base)).save_pretrained(str(tmp / "lora"))
            torch.save(dict(trainer_state), tmp / "trainer_state.pt")
    guard.agree()
    files = hash_files(tmp)  # every file but meta.json, which records them (hashing shared out by rank)
    if is_rank0():
        with guard.writing("meta.json"):
            _write_json_atomic(tmp / "meta.json", {"step": step, "world_size": world,
                                                   "has_proposal": proposal is not None,
                                                   "fingerprint": dict(fingerprint), "files": files})
    guard.agree()
    if is_rank0():
        _commit(tmp, final, ckdir)
        _rotate(ckdir, keep, final)
    barrier()
    return final


def load_checkpoint(ckpt_dir: str | os.PathLike, *, policy, proposal=None, fingerprint: Mapping[str, Any],
                    fingerprint_defaults: Mapping[str, Mapping[str, Any]] | None = None,
                    load_optimizer: bool = True) -> dict:
    """Restore engines, this rank's RNG states and return the trainer-state dict (collective).

    ckpt_dir: a directory ``find_intact`` returned (its files verified), saved on any world size (reshard.py
    re-partitions the policy, the proposal and maps the RNG states when it differs from this run's). Raises CheckpointMismatchError if the
    fingerprint differs (``check_fingerprint``, with ``fingerprint_defaults``), or if a proposal is expected but
    was not saved (or the other way round);
    CheckpointError if one of the project's own files holds anything but tensors and plain containers.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    check_fingerprint(ckpt_dir, fingerprint, fingerprint_defaults)
    if meta["has_proposal"] != (proposal is not None):
        raise CheckpointMismatchError(f"{ckpt_dir}: has_proposal={meta['has_proposal']} there, "
                                      f"{proposal is not None} here (on-policy vs separate proposal)")
    rank, saved_world = get_rank(), int(meta["world_size"])
    if saved_world == get_world_size():
        # LoRA: the saved module holds the policy adapter only (the frozen base comes from model.path).
        lora = getattr(policy.module, "adapters", None) is not None
        path, _ = policy.load_checkpoint(str(ckpt_dir / "policy"), tag=_DS_TAG, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer, load_module_strict=not lora)
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir / 'policy'}: DeepSpeed found no checkpoint with tag {_DS_TAG!r}")
        if proposal is not None:
            f = ckpt_dir / "proposal" / f"rank_{rank:05d}.pt"
            _load_shard_state(proposal, load_plain(f), f)
    else:  # saved on another world size: re-partitioned (reshard.py)
        load_policy_resharded(policy, ckpt_dir, _DS_TAG, load_optimizer=load_optimizer)
        if proposal is not None:
            saved = [load_plain(ckpt_dir / "proposal" / f"rank_{r:05d}.pt") for r in range(saved_world)]
            _load_shard_state(proposal, reshard_proposal_state(saved, proposal), ckpt_dir / "proposal")
    _set_rng_state(load_plain(ckpt_dir / "rng" / f"rank_{rank % saved_world:05d}.pt"))
    return load_plain(ckpt_dir / "trainer_state.pt")
