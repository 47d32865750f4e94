"""Stop cleanly at a step boundary when the job is told to go (SLURM's ``--signal``, a scheduler's SIGTERM).

The handler only sets a flag; the loop checks it after each optimizer step, all ranks agree (a signal may
reach only some of them), a checkpoint is written, and the process exits normally. The next run with the
same ``output_dir`` resumes from that checkpoint.
"""

from __future__ import annotations

import signal

from fdpg_scale.distributed.launch import all_reduce_floats

__all__ = ["PreemptionSignal"]

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionSignal:
    """A flag set by SIGUSR1/SIGTERM; ``requested()`` is collective (every rank calls it each step)."""

    def __init__(self):
        self.name: str | None = None

    @classmethod
    def install(cls) -> "PreemptionSignal":
        flag = cls()
        for sig in SIGNALS:
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank if any rank has received a stop signal."""
        return bool(all_reduce_floats([1.0 if self.name else 0.0], op="max")[0] > 0)
