"""A model directory built once and then reused: a stamp that says what was built, and an atomic swap-in.

``build_cached_dir(path, stamp, build, ...)`` returns at once when ``path`` holds every ``required`` file and
its stamp file (JSON) equals ``stamp``. Otherwise ``build(tmp)`` writes into a temporary sibling of ``path``,
the stamp is written last, and the directory is renamed into place, so a build killed halfway and several
processes (ranks) building at once never leave a half-written directory at ``path``. A directory at
``path`` that is not such a build is never overwritten: it may be someone's real model. A stale build of
ours (its stamp file is there but says something else) is replaced only when ``replace_stale``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["read_stamp", "is_built", "build_cached_dir"]


def read_stamp(path: Path, stamp_name: str) -> dict | None:
    """The JSON dict in ``path/stamp_name``, or None when it is missing or unreadable."""
    try:
        stamp = json.loads((path / stamp_name).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_built(path: Path, stamp: dict, stamp_name: str, required: Sequence[str]) -> bool:
    """True when ``path`` holds every ``required`` file and its stamp equals ``stamp``."""
    return all((path / name).is_file() for name in (*required, stamp_name)) and read_stamp(path, stamp_name) == stamp


def build_cached_dir(path: str | os.PathLike, stamp: dict, build: Callable[[Path], None], *, stamp_name: str,
                     required: Sequence[str], what: str, replace_stale: bool = False) -> bool:
    """Make sure ``path`` holds the build that ``stamp`` describes; returns True when it was already there.

    build: writes the files into the directory it is given (not the stamp). what: the build's name in the
    error raised when ``path`` exists and is something else (FileExistsError, naming ``path``).
    """
    path = Path(path)
    if is_built(path, stamp, stamp_name, required):
        return True
    if path.exists() and not (replace_stale and read_stamp(path, stamp_name) is not None):
        raise FileExistsError(f"{path} exists but is not {what} (missing files or a different {stamp_name}); "
                              f"remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    trash = None
    try:
        build(tmp)
        (tmp / stamp_name).write_text(json.dumps(stamp, indent=1) + "\n")
        for p in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700: a cache may be shared with other users' runs
            p.chmod(0o755 if p.is_dir() else 0o644)
        if path.exists():  # a stale build of ours (checked above): move it aside, then swap in the new one
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, trash / "old")
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_built(path, stamp, stamp_name, required):  # else another process renamed its build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return False
