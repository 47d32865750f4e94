"""The learning-rate schedule of every optimizer in the project: linear warm-up, then constant or cosine.

One formula for the f-DPG policy (``distributed.engines.build_policy``) and for pretraining the base model
(``apps.pretrain``), as a factor of the peak learning rate at optimizer step ``s`` (0-based), warm-up ``w``,
``total`` steps:

    s < w:     (s + 1) / w                       linear, the peak is reached at the last warm-up step
    constant:  1
    cosine:    floor + (1 − floor) · ½ (1 + cos(π · min(1, (s − w) / max(1, total − w))))

so the factor never is 0 (no wasted first step) and the cosine ends at ``floor`` at ``s = total``.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, *, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None,
              floor: float = 0.0) -> float:
    """The factor of the peak learning rate at 0-based optimizer ``step`` (formula in the module docstring).

    schedule: ``"constant"`` or ``"cosine"`` (which needs ``total_steps``); floor: the cosine's end value.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps is None:
        raise ValueError("schedule='cosine' needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
