"""A checkpoint's files: sizes and checksums recorded at save time, verified before any load; safe loading.

Disks fill up and copies get cut short: a checkpoint directory can be renamed into place complete and still
be damaged later (a truncated ``rsync``, a quota hit by ``cp``). So every save records, in ``meta.json``, the
size and sha256 of every file of the checkpoint; ``verify_files`` compares them before anything is loaded,
and the caller falls back to the newest checkpoint that passes.

The work is shared: file ``i`` (in sorted order) is hashed by rank ``i mod world``, and the results are
gathered, so a large ZeRO-3 checkpoint is read once in total, not once per rank.

``load_plain`` loads the project's own ``.pt`` files with ``torch.load(weights_only=True)``: tensors and plain
containers only. A pickled object (which could run code on load) is refused with one line. DeepSpeed's own
files (``policy/ds/``) are read by DeepSpeed's loader, which unpickles: a checkpoint directory is therefore
code-trusted input, like a Python file; only resume from directories you trust (README, "Checkpoints").
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from fdpg_scale.distributed.launch import get_rank, get_world_size
from fdpg_scale.errors import CheckpointError

__all__ = ["CheckpointError", "file_record", "hash_files", "verify_files", "load_plain"]

_CHUNK = 1 << 22  # 4 MiB reads: hashing speed is then bound by the disk, not by Python calls


def file_record(path: Path) -> list:
    """[size in bytes, sha256 hex] of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return [path.stat().st_size, digest.hexdigest()]


def _gather_objects(obj: Any) -> list:
    if torch.distributed.is_initialized() and get_world_size() > 1:
        out = [None] * get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def hash_files(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``root`` (collective when a process group is up).

    Every rank must see the same files (a shared filesystem, as checkpoints need anyway); rank r hashes the
    files r, r + world, ... of the sorted list, and all ranks return the merged result.
    """
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    names = [n for n in names if n not in exclude]
    rank, world = get_rank(), get_world_size()
    mine = {n: file_record(root / n) for n in names[rank::world]}
    merged: dict[str, list] = {}
    for part in _gather_objects(mine):
        merged.update(part)
    return merged


def _check_one(root: Path, name: str, expected: list) -> str | None:
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected[0]:
        return f"{name} has {size} bytes, {expected[0]} were written"
    if file_record(path)[1] != expected[1]:
        return f"{name} fails its sha256 check"
    return None


def verify_files(root: Path, files: dict[str, list]) -> str | None:
    """None if every recorded file under ``root`` has its recorded size and sha256, else the first problem
    (one line naming the file). Collective when a process group is up (the files are shared out by rank)."""
    if not isinstance(files, dict) or not files:
        return "meta.json records no file checksums (written by an older fdpg-scale, or edited)"
    names = sorted(files)
    rank, world = get_rank(), get_world_size()
    mine = [p for p in (_check_one(root, n, files[n]) for n in names[rank::world]) if p]
    problems = [p for part in _gather_objects(mine) for p in part]
    return sorted(problems)[0] if problems else None


def load_plain(path: Path) -> Any:
    """``torch.load`` of one of the project's own files, tensors and plain containers only (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain containers "
                              f"(a pickled object could run code; weights_only load said: {first})") from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {first})") from None

