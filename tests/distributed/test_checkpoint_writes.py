"""SaveGuard (distributed/checkpoint_writes.py) in one process: which errors count as a failed write, and the line
a failed save ends with. The real full disk, on 2 ranks, is tests/distributed/test_disk_full.py's."""

from __future__ import annotations

import errno
import json

import pytest

from fdpg_scale.distributed.checkpoint_writes import SaveGuard, checkpoint_bytes, is_write_failure
from fdpg_scale.errors import CheckpointWriteError

TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _previous(ckdir, size):
    d = ckdir / "step_00000004"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": 4, "files": {"a.pt": [size, "0" * 64]}}))
    return d


@pytest.mark.parametrize("err, counts", [(OSError(errno.ENOSPC, "No space left on device"), True), (TORCH_FULL, True),
                                         (RuntimeError("Timed out waiting 5000ms for recv operation"), False),
                                         (RuntimeError("CUDA out of memory"), False), (ValueError("x"), False)])
def test_what_counts_as_a_failed_write(err, counts):
    assert is_write_failure(err) is counts


def test_a_failed_write_ends_the_save_in_one_line_and_removes_the_unfinished_directory(tmp_path):
    ckdir = tmp_path / "checkpoints"
    previous = _previous(ckdir, 3 * 2 ** 20)
    tmp = ckdir / ".tmp-step_00000006"
    (tmp / "rng").mkdir(parents=True)
    (tmp / "rng" / "rank_00000.pt").write_bytes(b"x" * 1000)
    guard = SaveGuard(tmp, previous)
    guard.agree()                                   # nothing failed: a plain barrier
    with guard.writing("proposal/rank_00000.pt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with guard.writing("rng/rank_00000.pt"):        # a later failure does not replace the first
        raise TORCH_FULL
    with pytest.raises(CheckpointWriteError) as caught:
        guard.agree()
    line = str(caught.value)
    assert line.startswith("cannot save checkpoint step_00000006: no space left on the device (rank 0, writing "
                           "proposal/rank_00000.pt: [Errno 28] No space left on device); a checkpoint of this run takes "
                           "3.0 MiB (as step_00000004), "), line
    assert line.endswith("the unfinished save was removed; step_00000004 and `latest` are untouched: free space and "
                         "rerun to resume from step_00000004") and "\n" not in line
    assert not tmp.exists() and previous.is_dir()
    assert checkpoint_bytes(previous) == 3 * 2 ** 20 + (previous / "meta.json").stat().st_size


def test_other_errors_are_not_swallowed(tmp_path):
    guard = SaveGuard(tmp_path / ".tmp-step_00000001", None)
    with pytest.raises(KeyError), guard.writing("x"):
        raise KeyError("a bug, not a disk")
    assert not guard.failed
