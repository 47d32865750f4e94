"""Where a run is (step and phase), and the one line a rank prints when a collective fails there.

A rank that stops answering (a hung GPU, a stopped process, a node whose sockets stay open) leaves the others
waiting in their next collective. With ``distributed.timeout_s`` that collective fails after the timeout instead
of never (gloo raises; NCCL's watchdog aborts), and a rank that died outright makes its peers' collectives fail
at once (gloo: "Connection closed by peer"). Either way the error surfaces from deep inside torch or DeepSpeed
and says nothing about the run. ``collective_failures`` turns it into a ``RankLostError`` whose one line names
the step, the phase and the last checkpoint, so that the job ends non-zero (a scheduler can requeue it) with the
reason on record, and the next run resumes from that checkpoint.

The loop updates a ``RunProgress`` at each phase boundary (``at``); inside an optimizer step the phase is the
step timer's current phase (generation, scoring, logprobs, backward, ...).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Iterator

from fdpg_scale.distributed.launch import is_collective_failure
from fdpg_scale.errors import RankLostError

__all__ = ["RunProgress", "collective_failures", "is_collective_failure"]

class RunProgress:
    """The step being computed (1-based, None before the first) and the phase the run is in."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.phase = "start-up"
        self.last_checkpoint: Path | None = None
        self._detail: Callable[[], str | None] | None = None

    def at(self, phase: str, step: int | None = None, *, detail: Callable[[], str | None] | None = None) -> None:
        """Enter ``phase`` (of ``step``, if given). detail: called when the line is written, for a finer phase
        (the step timer's current one)."""
        self.phase, self._detail = phase, detail
        if step is not None:
            self.step = step

    def describe(self) -> str:
        """e.g. ``step 12 (phase: backward)``, ``start-up (phase: resume)``."""
        phase = (self._detail() if self._detail is not None else None) or self.phase
        return f"step {self.step} (phase: {phase})" if self.step is not None else f"start-up (phase: {phase})"


@contextlib.contextmanager
def collective_failures(progress: RunProgress, *, timeout_s: float) -> Iterator[RunProgress]:
    """Re-raise a failed collective inside the block as a ``RankLostError`` naming ``progress``'s step and phase;
    any other error passes unchanged."""
    try:
        yield progress
    except Exception as err:
        if not is_collective_failure(err):
            raise
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)  # gloo's "[.../unbound_buffer.cc:78] " source location
        resume = (f"a rerun resumes from {progress.last_checkpoint.name}" if progress.last_checkpoint is not None
                  else "no checkpoint was written by this run yet")
        raise RankLostError(f"a collective failed at {progress.describe()}: another rank stopped answering "
                            f"for distributed.timeout_s={timeout_s:g} s or died ({cause}); stopping with a non-zero "
                            f"status so that the job can be requeued; {resume}") from None
