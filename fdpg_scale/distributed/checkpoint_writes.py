"""A checkpoint save that cannot write (a full disk, a quota) ends the run in one line, the previous one intact.

A full disk surfaces differently by writer: Python's files raise ``OSError(ENOSPC)``; ``torch.save`` (and so
DeepSpeed's shards) raises a RuntimeError from its zip writer ("[enforce fail at inline_container.cc:672] .
unexpected pos 576 vs 534"), which names neither the file nor the cause. And it reaches the ranks unevenly: one
rank's shard fails while the others' are written. A rank that just raised would leave the others waiting in the
save's next collective (until ``distributed.timeout_s``) and the run's last line would be a torch traceback.

So ``save_checkpoint`` writes through a ``SaveGuard``: each rank records the first write that failed
(``writing``), and at each of the save's synchronisation points every rank learns whether any failed
(``agree``, in place of a barrier). If one did, rank 0 removes the unfinished ``.tmp-step_*`` (freeing what it
held), and every rank raises the same ``CheckpointWriteError``: one line with the failed file, the space a
checkpoint of this run needs (the newest checkpoint's recorded size) and the space left. Nothing was renamed into
place, so the previous checkpoint and ``latest`` are untouched and a rerun with space resumes from them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from fdpg_scale.distributed.launch import all_reduce_floats, get_rank, get_world_size, is_collective_failure
from fdpg_scale.errors import CheckpointWriteError

__all__ = ["SaveGuard", "is_write_failure", "checkpoint_bytes"]

#: What torch's zip writer says when a write comes up short (torch 2.13: "unexpected pos N vs M").
_TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter", "unexpected pos", "file write failed")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_write_failure(err: BaseException) -> bool:
    """True for an error a failed file write raises: an OSError, or torch's zip writer's RuntimeError."""
    if is_collective_failure(err):
        return False
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITER))


def checkpoint_bytes(ckpt_dir: Path) -> int | None:
    """The bytes of a committed checkpoint, from the sizes its ``meta.json`` records (None if it cannot tell)."""
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
        return sum(int(size) for size, _ in meta["files"].values()) + (ckpt_dir / "meta.json").stat().st_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


class SaveGuard:
    """This rank's first failed write during one save, and the collective check of every rank's.

    tmp: the save's ``.tmp-step_*`` directory; previous: the newest committed checkpoint (None if none).
    """

    def __init__(self, tmp: Path, previous: Path | None):
        self.tmp, self.previous = tmp, previous
        self.failure: tuple[str, BaseException] | None = None

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Record a write failure inside the block (``what``: the file or files being written) instead of raising;
        any other error passes. After a failure the block's remaining writes are skipped, not the later blocks':
        callers check ``failed`` where a later write depends on an earlier one."""
        try:
            yield
        except Exception as err:
            if not is_write_failure(err):
                raise
            if self.failure is None:
                self.failure = (what, err)

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def agree(self) -> None:
        """Collective (a barrier for the save): raise CheckpointWriteError on every rank if any rank's write
        failed, after rank 0 has removed the unfinished directory."""
        flags = all_reduce_floats([1.0 if self.failed else 0.0], op="max")
        if flags[0] == 0:
            return
        mine = None
        if self.failure is not None:
            what, err = self.failure
            code = err.errno if isinstance(err, OSError) else None
            mine = (get_rank(), what, code, (str(err).strip().splitlines() or [type(err).__name__])[0])
        reports = [mine]
        if torch.distributed.is_initialized() and get_world_size() > 1:
            reports = [None] * get_world_size()
            torch.distributed.all_gather_object(reports, mine)
        rank, what, code, text = next(r for r in reports if r is not None)
        written = _tree_bytes(self.tmp)
        if get_rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if torch.distributed.is_initialized() and get_world_size() > 1:
            torch.distributed.barrier()  # the directory is gone before any rank reports (and the run exits)
        raise CheckpointWriteError(self._message(rank, what, code, text, written))

    def _message(self, rank: int, what: str, code: int | None, text: str, written: int) -> str:
        ckdir = self.tmp.parent
        free = shutil.disk_usage(ckdir).free
        need = checkpoint_bytes(self.previous) if self.previous is not None else None
        if need is not None:
            size = f"a checkpoint of this run takes {_mib(need)} (as {self.previous.name})"
        else:
            size = f"a checkpoint of this run takes more than the {_mib(written)} written before the failure"
        full = code in _FULL or (code is None and free < (need or written + 1))
        reason = "no space left on the device" if full else f"a write failed{f' ({os.strerror(code)})' if code else ''}"
        kept = (f"{self.previous.name} and `latest` are untouched: free space and rerun to resume from "
                f"{self.previous.name}") if self.previous is not None else "no earlier checkpoint exists"
        return (f"cannot save checkpoint {self.tmp.name.removeprefix('.tmp-')}: {reason} (rank {rank}, writing "
                f"{what}: {text}); {size}, {_mib(free)} are free in {ckdir}; the unfinished save was removed; {kept}")
