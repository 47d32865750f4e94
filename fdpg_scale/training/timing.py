"""Wall-clock time per phase of a step (generation, scoring, log-probs, backward), summed over micro-steps."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable

import torch

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates seconds per named phase; ``as_metrics()`` gives ``{"time/<phase>": seconds}``.

    device: where the timed work runs. On a CUDA device every phase starts and ends with a device
    synchronisation: kernel launches return before the kernels finish, so without it a phase would be
    credited with its launches only and the next phase with the GPU work still queued (a ``.item()`` there
    waits for it). On the CPU (or None) nothing is synchronised. The synchronisations cost a few microseconds
    each, a handful per step.
    sync: the synchronisation to call instead (tests pass a recorder); default from ``device``.
    """

    def __init__(self, device: torch.device | str | None = None, *, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        if sync is None and device is not None and torch.device(device).type == "cuda":
            cuda_device = torch.device(device)
            sync = lambda: torch.cuda.synchronize(cuda_device)  # noqa: E731
        self._sync = sync
        self._open: list[str] = []
        self._left_by_error: str | None = None

    @property
    def current(self) -> str | None:
        """The innermost phase running now; once an exception has left a phase, that phase (so that the error's
        report can name where it struck); None between phases."""
        return self._open[-1] if self._open else self._left_by_error

    @contextlib.contextmanager
    def phase(self, name: str):
        self._open.append(name)
        try:
            if self._sync is not None:
                self._sync()
            start = time.perf_counter()
            try:
                yield
            except BaseException:
                if self._left_by_error is None:
                    self._left_by_error = name  # the innermost phase: the first one the exception leaves
                raise
            finally:
                if self._sync is not None:
                    self._sync()
                self.seconds[name] += time.perf_counter() - start
        finally:
            self._open.pop()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.seconds.items()}
