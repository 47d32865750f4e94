"""Alignment tasks named in configs: a target P(x) = a(x)·(scorers) plus the feature that measures alignment.

``target.scorer`` names one of ``SCORERS``; ``target.kind`` says how it enters the target:

- ``pointwise``: the scorer is a boolean constraint b(x); P = a·b; alignment = E_π[b];
- ``reward``: the scorer is a number r(x); P = a·exp(r/β); alignment = E_π[r];
- ``distributional``: the scorer is a feature φ(x); P = a·exp(λφ) with λ fitted so that E_p[φ] =
  ``target.moment`` (``fdpg_scale.training.target_fitting``); alignment = E_π[φ].

Each scorer reads the decoded texts of ``Samples``; its arguments come from ``target.scorer_args``.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.energy import BooleanScorer, EnergyTarget, ExponentialScorer, RewardScorer

if TYPE_CHECKING:  # annotation only: targets sit below training and never import it at run time
    from fdpg_scale.training.config import TargetConfig

__all__ = ["Task", "build_task", "SCORERS"]


def contains(samples: Samples, *, substring: str) -> torch.Tensor:
    """[B] 1.0 where the decoded sample contains ``substring``."""
    return torch.tensor([substring in t for t in samples.texts], dtype=torch.float32)


def count(samples: Samples, *, substring: str) -> torch.Tensor:
    """[B] number of (non-overlapping) occurrences of ``substring`` in the decoded sample."""
    return torch.tensor([float(t.count(substring)) for t in samples.texts], dtype=torch.float32)


def parses_as_python(samples: Samples) -> torch.Tensor:
    """[B] 1.0 where the decoded sample is non-blank and parses as a Python module (``ast.parse``)."""
    return torch.tensor([_parses(t) for t in samples.texts], dtype=torch.float32)


def _parses(text: str) -> bool:
    if not text.strip():
        return False
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


SCORERS: dict[str, Callable[..., torch.Tensor]] = {"contains": contains, "count": count,
                                                   "parses_as_python": parses_as_python}


@dataclass(frozen=True)
class Task:
    """A target and the feature whose mean under π reports alignment."""

    target: EnergyTarget
    feature: Callable[[Samples], torch.Tensor]
    """Samples → [B] float32: b(x) for a pointwise task, r(x) for a reward task, φ(x) for a distributional one."""
    moment: float | None = None
    """distributional: the target E_p[φ]; λ is then to be fitted (``needs_fit``)."""

    @property
    def exponential(self) -> ExponentialScorer | None:
        """The distributional task's scorer exp(λφ) (None for the other kinds)."""
        scorer = self.target.scorers[0]
        return scorer if isinstance(scorer, ExponentialScorer) else None

    def with_lambdas(self, lambdas) -> "Task":
        """The same distributional task with λ set (λ: K floats)."""
        return Task(target=EnergyTarget([self.exponential.with_lambdas(lambdas)]), feature=self.feature,
                    moment=self.moment)


def build_task(cfg: TargetConfig, tokenizer=None) -> Task:
    """The task described by the ``target`` section of a run config."""
    if cfg.scorer not in SCORERS:
        raise ConfigError(f"target.scorer {cfg.scorer!r} is unknown; valid: {', '.join(SCORERS)}")
    fn = SCORERS[cfg.scorer]
    wanted = {name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    given = set(cfg.scorer_args)
    if given != wanted:
        raise ConfigError(f"target.scorer_args for {cfg.scorer!r} must be exactly {sorted(wanted)}, got "
                          f"{sorted(given)}")
    args = dict(cfg.scorer_args)

    def feature(samples: Samples) -> torch.Tensor:
        return fn(samples, **args)

    if cfg.kind == "pointwise":
        scorer = BooleanScorer(lambda s: feature(s) > 0, name=cfg.scorer)
    elif cfg.kind == "reward":
        scorer = RewardScorer(feature, beta=cfg.beta, name=cfg.scorer)
    else:  # distributional: λ = 0 until fitted
        scorer = ExponentialScorer({cfg.scorer: feature}, name=cfg.scorer)
    return Task(target=EnergyTarget([scorer]), feature=feature,
                moment=cfg.moment if cfg.kind == "distributional" else None)
