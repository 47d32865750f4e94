"""Wall-clock time per phase of a step (generation, scoring, log-probs, backward), summed over micro-steps."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates seconds per named phase; ``as_metrics()`` gives ``{"time/<phase>": seconds}``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.seconds.items()}
