"""No NaN reaches a checkpoint: a step whose samples, loss or gradients are not finite is skipped or stops the run.

Three places a NaN (or inf) can enter a step, each checked on all ranks together (one all-reduced flag, so
every rank takes the same branch and no collective is left waiting):

It implements ``fdpg_scale.core.step.StepGuard``, which ``fdpg_step`` calls at two points:

1. **the samples** (``samples_ok``, before log Z is updated): a scorer, the base model or the proposal gave
   NaN/+inf for some x. Nothing of the step has been applied yet: skipping it leaves log Z, the baseline and
   the engines untouched.
2. **the loss and gradients** (``update_ok``, after the accumulation boundary): log π or the f-DPG weights
   were not finite. Their gradients are then not finite, and DeepSpeed's ZeRO-3 optimizer drops that update
   itself (it checks the global gradient norm, zeroes the gradients and counts ``skipped_steps``); here the
   rest of the step (baseline, proposal swap, metrics) is skipped too, so no running statistic takes a NaN.
3. **the weights** after an update (``update_ok``): an update can make finite weights non-finite (a huge
   or infinite learning rate). It cannot be undone, so the run always stops, before anything is saved.

``train.on_nonfinite`` chooses between ``skip`` (counted in the ``nonfinite_skips`` metric and logged; the run
stops after ``train.max_consecutive_skips`` in a row, since it would learn nothing) and ``stop`` (one line,
exit status 3, the last checkpoint intact).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fdpg_scale.distributed.launch import all_reduce_floats, get_world_size
from fdpg_scale.errors import NonFiniteError
from fdpg_scale.training.config import TrainConfig

__all__ = ["NonFiniteGuard", "weights_finite"]


def _any_rank(flag: bool) -> bool:
    return bool(all_reduce_floats([1.0 if flag else 0.0], op="max")[0] > 0)


def _first_reason(reason: str | None) -> str:
    """The lowest rank's reason (every rank gets the same text for the one-line message)."""
    reasons = [reason]
    if torch.distributed.is_initialized() and get_world_size() > 1:
        reasons = [None] * get_world_size()
        torch.distributed.all_gather_object(reasons, reason)
    return next((f"rank {r}: {text}" if len(reasons) > 1 else text for r, text in enumerate(reasons) if text),
                "on another rank")


@torch.no_grad()
def weights_finite(engine) -> bool:
    """Whether this rank's shard of every trainable parameter of a ZeRO-3 engine is finite (local, no collective)."""
    for p in engine.module.parameters():
        if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()):
            return False
    return True


class NonFiniteGuard:
    """Decides, identically on every rank, what a step with non-finite values does (see the module docstring).

    train: the run's ``train`` section (``on_nonfinite``, ``max_consecutive_skips``); message: prints a line
    (rank 0's logger); policy: the trainable DeepSpeed engine. ``skips`` counts the steps skipped so far in this
    process; ``metrics()`` is what the loop logs with every step.
    """

    def __init__(self, train: TrainConfig, message: Callable[[str], None], policy):
        self.message = message
        self.policy = policy
        self.mode = train.on_nonfinite
        self.max_consecutive = train.max_consecutive_skips
        self.skips = 0
        self.consecutive = 0
        self._ds_skipped = None  # the policy engine's skipped_steps before this step

    def metrics(self) -> dict:
        return {"nonfinite_skips": self.skips}

    def samples_ok(self, draws, step: int) -> bool:
        """False if step ``step`` (1-based) is to be skipped because some sample's log q, log a or log P is NaN
        or +inf on some rank; raises NonFiniteError under ``stop``. Collective. draws: this rank's ``Draws``."""
        reason = None
        for d in draws:
            for name, values in (("log q(x) of the proposal", d.logq), ("log a(x) of the base model", d.log_base),
                                 ("the target's log-score", d.log_target)):
                bad = torch.isnan(values) | (values == math.inf)
                if bool(bad.any()):
                    reason = d.problem or f"{name} is {values[bad][0].item()}"
                    break
            if reason:
                break
        return not self._decide(_any_rank(reason is not None), reason, step, "its samples")

    def before_update(self) -> None:
        """Remember DeepSpeed's skipped-step count (before the step's first backward)."""
        self._ds_skipped = self.policy.skipped_steps

    def update_ok(self, logp_pi: torch.Tensor, weight: torch.Tensor, step: int) -> bool:
        """After the step's last backward and optimizer step: False if the update was dropped because the loss
        or the gradients were not finite (the step then leaves the baseline and the proposal alone); raises
        NonFiniteError under ``stop`` or when the weights themselves became non-finite. logp_pi, weight: this
        rank's [n] log π(x) and f-DPG weights. Collective."""
        reason = None
        for name, values in (("log π(x)", logp_pi), ("an f-DPG weight", weight)):
            if not bool(torch.isfinite(values).all()):
                reason = f"{name} is {values[~torch.isfinite(values)][0].item()}"
                break
        dropped = self.policy.skipped_steps != self._ds_skipped  # ZeRO-3 found a non-finite gradient norm
        if dropped and reason is None:
            reason = "the gradient norm is not finite"
        if _any_rank(not weights_finite(self.policy)):
            raise NonFiniteError(f"step {step}: the policy's weights are not finite after the optimizer step "
                                 f"(train.lr={self.policy.get_lr()[0]:g}); the run stops before anything is saved, "
                                 f"the last checkpoint is intact: lower train.lr or check the data")
        return not self._decide(dropped or _any_rank(reason is not None), reason, step, "its loss or gradients")

    def _decide(self, bad: bool, reason: str | None, step: int, what: str) -> bool:
        if not bad:
            self.consecutive = 0
            return False
        reason = _first_reason(reason)
        if self.mode == "stop":
            raise NonFiniteError(f"step {step}: {what} are not finite ({reason}); train.on_nonfinite is 'stop': the "
                                 f"run stops, the last checkpoint is intact")
        self.skips += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"step {step}: {self.consecutive} steps in a row had non-finite values (last: {what}, "
                                 f"{reason}); train.max_consecutive_skips={self.max_consecutive} reached: the run "
                                 f"stops, the last checkpoint is intact")
        self.message(f"step {step} skipped: {what} are not finite ({reason}); {self.skips} skipped so far "
                     f"(train.on_nonfinite: skip)")
        return True
