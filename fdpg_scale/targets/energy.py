"""Energy-based target distributions p(x) = P(x)/Z with P(x) = a(x) · Π_k s_k(x) (docs/method.md §1).

a is the base (original) LM; each *scorer* s_k contributes a non-negative factor, always handled in log
space (log s_k = −inf is a legal zero: the sample is outside the target's support):

- ``BooleanScorer``:     s(x) = b(x) ∈ {0, 1}             pointwise constraint, log s ∈ {0, −inf}
- ``ExponentialScorer``: s(x) = exp(λ·φ(x))               distributional constraint, λ fitted (below)
- ``RewardScorer``:      s(x) = exp(r(x)/β)               RLHF-style (reverse-KL f-DPG = KL-penalised RL)

``EnergyTarget`` sums the log-scores, validates them (a NaN or +inf score is a bug in a scorer, never a
probability) and adds log a(x): log P(x) = log a(x) + Σ_k log s_k(x).

Fitting λ (GDC, Khalifa et al. 2021) is a problem of moments, solved in ``fdpg_scale.core.moment_fitting``
(``fit_lambdas``); ``ExponentialScorer.fit`` runs it on a batch.

Conditional targets: P(x|c) = a(x|c) Π_k s_k(x, c), one target per context c with its own Z(c). Scorers
read ``samples.context_ids`` / ``samples.contexts`` when they depend on c; nothing else changes on the target
side. The per-context log Z(c) lives with the estimator (fdpg_scale.core.estimator); the grouping by context
and the per-context log-mean-exp are in fdpg_scale.core.logspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fdpg_scale.core.moment_fitting import LambdaFit, fit_lambdas  # ExponentialScorer.fit runs it
from fdpg_scale.errors import NonFiniteScoreError  # re-exported: raised here for built-in scorers
from fdpg_scale.targets.samples import Samples

__all__ = ["Scorer", "NonFiniteScoreError", "BooleanScorer", "ExponentialScorer", "RewardScorer", "EnergyTarget"]

BatchFn = Callable[[Samples], object]
"""A function of the batch returning B values (a tensor, numpy array or list)."""


@runtime_checkable
class Scorer(Protocol):
    """One factor s(x) of the energy: ``log_score(samples) -> Tensor [B] float32`` (−inf allowed)."""

    name: str

    def log_score(self, samples: Samples) -> torch.Tensor: ...


def _batch_vector(value, b: int, what: str) -> torch.Tensor:
    """``value`` (tensor / array / list) as a tensor [b], or a ValueError naming ``what`` and the shapes."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.shape != (b,):
        raise ValueError(f"{what} returned shape {tuple(t.shape)}, expected [B] = ({b},)")
    return t


def _first_bad(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask).flatten()[0])


@dataclass(frozen=True)
class BooleanScorer:
    """Pointwise constraint b(x) ∈ {0, 1}: log b = 0 where it holds, −inf where it does not."""

    fn: BatchFn
    """samples -> B bools (or 0/1 numbers): whether each sample satisfies the constraint."""
    name: str

    def holds(self, samples: Samples) -> torch.Tensor:
        """BoolTensor [B]: b(x) for each sample."""
        b = _batch_vector(self.fn(samples), samples.batch_size, f"BooleanScorer {self.name!r}")
        if b.dtype != torch.bool:
            if not bool(((b == 0) | (b == 1)).all()):
                i = _first_bad(~((b == 0) | (b == 1)))
                raise ValueError(f"BooleanScorer {self.name!r} returned {b[i].item()!r} at sample {i}; "
                                 f"expected bools or 0/1")
            b = b != 0
        return b

    def log_score(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: 0 where b(x) = 1, −inf where b(x) = 0."""
        b = self.holds(samples)
        return torch.where(b, 0.0, -math.inf).to(torch.float32)


@dataclass(frozen=True)
class RewardScorer:
    """s(x) = exp(r(x)/β): P(x) = a(x) e^{r(x)/β}, the optimum of KL-penalised reward maximisation."""

    fn: BatchFn
    """samples -> B rewards r(x) (floats; −inf allowed and means score 0)."""
    beta: float
    """Temperature β > 0 (the KL penalty's coefficient)."""
    name: str = "reward"

    def __post_init__(self):
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"RewardScorer {self.name!r}: beta must be a finite number > 0, got {self.beta!r}")

    def reward(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: r(x)."""
        return _batch_vector(self.fn(samples), samples.batch_size, f"RewardScorer {self.name!r}").to(torch.float32)

    def log_score(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: r(x)/β."""
        return self.reward(samples) / self.beta


class ExponentialScorer:
    """s(x) = exp(λ·φ(x)), φ = (φ_1 … φ_K) named features, λ ∈ R^K (fitted with ``fit``)."""

    def __init__(self, features: Mapping[str, BatchFn], lambdas: Sequence[float] | torch.Tensor | None = None,
                 *, name: str = "exponential"):
        """features: name -> (samples -> B floats), in order; lambdas: K floats (default zeros: s = 1)."""
        if not features:
            raise ValueError(f"ExponentialScorer {name!r}: features must name at least one feature")
        self.name = name
        self.feature_names = tuple(features)
        self._fns = tuple(features.values())
        lam = torch.zeros(len(self._fns), dtype=torch.float64) if lambdas is None else \
            torch.as_tensor(lambdas, dtype=torch.float64).clone()
        if lam.shape != (len(self._fns),) or not bool(torch.isfinite(lam).all()):
            raise ValueError(f"ExponentialScorer {name!r}: lambdas must be {len(self._fns)} finite floats (one per "
                             f"feature {list(self.feature_names)}), got {lam.tolist()}")
        self.lambdas = lam
        """float64 [K]."""

    def features(self, samples: Samples) -> torch.Tensor:
        """float64 [B, K]: φ(x) for each sample; a non-finite feature value is a ValueError naming it."""
        b = samples.batch_size
        cols = []
        for fname, fn in zip(self.feature_names, self._fns):
            col = _batch_vector(fn(samples), b, f"feature {fname!r} of ExponentialScorer {self.name!r}")
            col = col.to(torch.float64)
            if not bool(torch.isfinite(col).all()):
                i = _first_bad(~torch.isfinite(col))
                raise NonFiniteScoreError(f"feature {fname!r} of ExponentialScorer {self.name!r} is {col[i].item()} "
                                          f"at sample {i}; features must be finite")
            cols.append(col)
        return torch.stack(cols, dim=-1)

    def log_score(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: λ·φ(x)."""
        return (self.features(samples) @ self.lambdas).to(torch.float32)

    def with_lambdas(self, lambdas: Sequence[float] | torch.Tensor) -> ExponentialScorer:
        """A copy with other λ (the features are shared)."""
        return ExponentialScorer(dict(zip(self.feature_names, self._fns)), lambdas, name=self.name)

    def fit(self, samples: Samples, target_moments: Sequence[float] | torch.Tensor, *, log_a: torch.Tensor,
            log_q: torch.Tensor, **kwargs) -> tuple[ExponentialScorer, LambdaFit]:
        """Fit λ so that E_p[φ] = target_moments by SNIS on ``samples`` (x_i ∼ q); start from the current λ.

        log_a, log_q: [B] log a(x_i), log q(x_i). kwargs: ``fit_lambdas``'s options (counts, tol, max_iter,
        min_ess, max_log_change).
        Returns the fitted scorer and the fit report.
        """
        kwargs.setdefault("init", self.lambdas)
        fit = fit_lambdas(self.features(samples), target_moments, log_a, log_q, **kwargs)
        return self.with_lambdas(fit.lambdas), fit

    def __repr__(self) -> str:
        return (f"ExponentialScorer(name={self.name!r}, features={list(self.feature_names)}, "
                f"lambdas={self.lambdas.tolist()})")


class EnergyTarget:
    """P(x) = a(x) · Π_k s_k(x) in log space: log P = log a + Σ_k log s_k, every score validated."""

    def __init__(self, scorers: Sequence[Scorer]):
        for s in scorers:
            if not isinstance(s, Scorer):
                raise ValueError(f"EnergyTarget: {s!r} is not a scorer (needs .name and .log_score(samples))")
        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"EnergyTarget: scorer names must be unique, got {names}")
        self.scorers = tuple(scorers)

    def log_scores(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: Σ_k log s_k(x) (0 with no scorers). A scorer output of the wrong shape, or with NaN or
        +inf, is a ValueError naming the scorer and the first offending sample; −inf (score 0) is legal."""
        b = samples.batch_size
        total = torch.zeros(b, dtype=torch.float32)
        for s in self.scorers:
            out = _batch_vector(s.log_score(samples), b, f"scorer {s.name!r}")
            if not out.dtype.is_floating_point:
                raise ValueError(f"scorer {s.name!r} returned dtype {out.dtype}; expected a float tensor [B]")
            bad = torch.isnan(out) | (out == math.inf)
            if bool(bad.any()):
                i = _first_bad(bad)
                raise NonFiniteScoreError(f"scorer {s.name!r} returned log-score {out[i].item()} at sample {i} "
                                          f"(NaN and +inf are never valid; −inf means score 0)")
            total = total + out.to(torch.float32)
        return total

    def log_target(self, base_logprob: torch.Tensor, samples: Samples) -> torch.Tensor:
        """[B] log P(x) = log a(x) + Σ_k log s_k(x), in base_logprob's dtype if wider than float32.

        base_logprob: [B] per-sequence log a(x) (finite or −inf)."""
        b = samples.batch_size
        if not isinstance(base_logprob, torch.Tensor) or base_logprob.shape != (b,):
            raise ValueError(f"EnergyTarget.log_target: base_logprob must be a tensor [B] = ({b},), got "
                             f"{tuple(getattr(base_logprob, 'shape', ()))}")
        bad = torch.isnan(base_logprob) | (base_logprob == math.inf)
        if bool(bad.any()):
            i = _first_bad(bad)
            raise ValueError(f"EnergyTarget.log_target: base_logprob is {base_logprob[i].item()} at sample {i}")
        scores = self.log_scores(samples)
        return base_logprob.to(torch.promote_types(base_logprob.dtype, torch.float32)) + scores

    def features(self, samples: Samples) -> dict[str, torch.Tensor]:
        """name -> float32 [B]: the quantities whose π-expectation measures constraint satisfaction: every
        ExponentialScorer feature φ_k (under its feature name) and every BooleanScorer's b(x) as 0/1 (under
        the scorer's name). For ``metrics.importance_sampled_metrics(features=...)``."""
        out = {}
        for s in self.scorers:
            if isinstance(s, ExponentialScorer):
                for name, col in zip(s.feature_names, s.features(samples).unbind(-1)):
                    out[name] = col.to(torch.float32)
            elif isinstance(s, BooleanScorer):
                out[s.name] = s.holds(samples).to(torch.float32)
        return out

