"""Energy-based target distributions p(x) = P(x)/Z with P(x) = a(x) · Π_k s_k(x) (docs/method.md §1).

a is the base (original) LM; each *scorer* s_k contributes a non-negative factor, always handled in log
space (log s_k = −inf is a legal zero: the sample is outside the target's support):

- ``BooleanScorer``:     s(x) = b(x) ∈ {0, 1}             pointwise constraint, log s ∈ {0, −inf}
- ``ExponentialScorer``: s(x) = exp(λ·φ(x))               distributional constraint, λ fitted (below)
- ``RewardScorer``:      s(x) = exp(r(x)/β)               RLHF-style (reverse-KL f-DPG = KL-penalised RL)

``EnergyTarget`` sums the log-scores, validates them (a NaN or +inf score is a bug in a scorer, never a
probability) and adds log a(x): log P(x) = log a(x) + Σ_k log s_k(x).

Fitting λ (GDC, Khalifa et al. 2021). p_λ(x) ∝ a(x) exp(λ·φ(x)) is the max-entropy / min-KL(·‖a)
distribution with moments E_p[φ] = μ̄. Its dual is the convex function

    L(λ) = log Z(λ) − λ·μ̄,    Z(λ) = Σ_x a(x) e^{λ·φ(x)} = E_q[(a/q) e^{λ·φ}],
    ∇L = E_{p_λ}[φ] − μ̄,      ∇²L = Cov_{p_λ}(φ) ⪰ 0,

so the λ that hits the moments is the minimiser of L. With samples x_i ∼ q the sample version replaces
Z(λ) by (1/N) Σ_i w0_i e^{λ·φ_i}, w0_i = a(x_i)/q(x_i); its gradient is the self-normalised importance
sampling (SNIS) estimate μ̂(λ) − μ̄ with normalised weights w_i ∝ w0_i e^{λ·φ_i}, and its Hessian the SNIS
covariance Σ_i w_i (φ_i − μ̂)(φ_i − μ̂)ᵀ. ``fit_lambdas`` runs damped Newton on it (backtracking line search
on L itself, which keeps every step a descent step) until max_k |μ̂_k − μ̄_k| < tol.

The sample dual is bounded below iff μ̄ lies in the convex hull of the observed φ_i (rows with a > 0); if
it does not, some direction d has d·(φ_i − μ̄) < 0 for every i and L → −∞ along it: no finite λ reaches μ̄.
Such a direction is a certificate; the per-feature range check catches the common case up front, and during
the iterations the directions μ̄ − μ̂ and λ (the ones Newton drifts along when μ̄ is outside) are checked too.
The fit also fails loudly when the effective sample size (Σw)²/Σw² of the final weights collapses below
``min_ess``: μ̂ then rests on a handful of samples and says nothing about E_p[φ].

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

from fdpg_scale.errors import NonFiniteScoreError  # re-exported: raised here for built-in scorers
from fdpg_scale.targets.samples import Samples

__all__ = ["Scorer", "NonFiniteScoreError", "BooleanScorer", "ExponentialScorer", "RewardScorer", "EnergyTarget",
           "LambdaFit", "fit_lambdas"]

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


@dataclass(frozen=True)
class LambdaFit:
    """Report of ``fit_lambdas``; every tensor is float64 [K]."""

    lambdas: torch.Tensor
    moments: torch.Tensor
    """μ̂(λ): the SNIS estimate of E_p[φ] at the returned λ."""
    target: torch.Tensor
    """μ̄."""
    moment_stderr: torch.Tensor
    """Delta-method standard error of μ̂ at λ, sqrt(Σ_i w_i² (φ_i − μ̂)²) over the draws (w normalised): how far
    the exact E_p[φ] may be from μ̂ because of sampling, whatever the fit's tolerance."""
    error: float
    """max_k |μ̂_k − μ̄_k|."""
    iterations: int
    ess: float
    """(Σw)²/Σw² of the final weights."""


def fit_lambdas(phi: torch.Tensor, target_moments: Sequence[float] | torch.Tensor, log_a: torch.Tensor,
                log_q: torch.Tensor, *, counts: torch.Tensor | None = None, tol: float = 1e-6, max_iter: int = 100,
                min_ess: float = 10.0, max_log_change: float = 4.0,
                init: Sequence[float] | torch.Tensor | None = None) -> LambdaFit:
    """λ with SNIS moments μ̂(λ) = μ̄ for p_λ ∝ a·exp(λ·φ), from samples x_i ∼ q (module docstring).

    phi: [N, K] φ(x_i); target_moments: [K] μ̄; log_a: [N] log a(x_i) (−inf allowed: the row has no weight);
    log_q: [N] log q(x_i), finite; counts: [N] how many of the draws each row stands for (draws aggregated by
    distinct sequence; default 1 each): the fit, ESS and standard errors are those of the expanded draws. To
    fit on a full enumeration instead of samples, pass every sequence once with log_q = 0 (each row then
    stands for itself) and min_ess=0 (the "ESS" of an enumeration is 1/Σ p², no sample size; nor is
    moment_stderr then an error). init: [K] starting λ (default 0).

    Damped Newton until max_k |μ̂_k − μ̄_k| < tol; each step is shortened so that no sample's log-weight moves
    by more than ``max_log_change`` nats relative to the mean (Newton's quadratic model is only trusted that
    far: near the hull's boundary the Hessian vanishes and a full step flies off).

    Raises ValueError when μ̄ is certified outside the convex hull of the observed φ (unreachable), and
    RuntimeError when the final ESS < min_ess or Newton does not converge in max_iter iterations.
    """
    phi = torch.as_tensor(phi, dtype=torch.float64)
    target = torch.as_tensor(target_moments, dtype=torch.float64).flatten()
    if phi.dim() != 2 or phi.shape[1] != target.shape[0]:
        raise ValueError(f"fit_lambdas: phi must be [N, K] with K = len(target_moments) = {target.shape[0]}, "
                         f"got phi of shape {tuple(phi.shape)}")
    n, k = phi.shape
    log_a = torch.as_tensor(log_a, dtype=torch.float64)
    log_q = torch.as_tensor(log_q, dtype=torch.float64)
    if log_a.shape != (n,) or log_q.shape != (n,):
        raise ValueError(f"fit_lambdas: log_a and log_q must be [N] = ({n},), got {tuple(log_a.shape)} and "
                         f"{tuple(log_q.shape)}")
    if not bool(torch.isfinite(phi).all()) or not bool(torch.isfinite(target).all()):
        raise ValueError("fit_lambdas: phi and target_moments must be finite")
    if not bool(torch.isfinite(log_q).all()) or bool(torch.isnan(log_a).any()) or bool((log_a == math.inf).any()):
        raise ValueError("fit_lambdas: log_q must be finite and log_a must be finite or −inf")
    log_w0 = log_a - log_q
    if counts is not None:
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape != (n,) or not bool((counts > 0).all()) or not bool(torch.isfinite(counts).all()):
            raise ValueError(f"fit_lambdas: counts must be [N] = ({n},) positive finite numbers, got shape "
                             f"{tuple(counts.shape)}")
        log_w0 = log_w0 + counts.log()
    else:
        counts = torch.ones(n, dtype=torch.float64)
    support = torch.isfinite(log_w0)
    if not bool(support.any()):
        raise ValueError(f"fit_lambdas: all {n} samples have a(x) = 0; nothing to fit on")
    phi, log_w0, counts = phi[support], log_w0[support], counts[support]

    lo, hi = phi.min(0).values, phi.max(0).values
    outside = (target < lo) | (target > hi)
    if bool(outside.any()):
        j = int(torch.nonzero(outside).flatten()[0])
        raise ValueError(f"fit_lambdas: target moment {j} = {target[j].item():g} is unreachable: the observed "
                         f"feature {j} lies in [{lo[j].item():g}, {hi[j].item():g}] over the {phi.shape[0]} "
                         f"samples with a(x) > 0")
    scale = float((hi - lo).abs().max().clamp_min(1e-300))

    def evaluate(lam):
        logits = log_w0 + phi @ lam
        lse = torch.logsumexp(logits, 0)
        w = torch.exp(logits - lse)
        return float(lse - lam @ target), w, w @ phi

    lam = torch.zeros(k, dtype=torch.float64) if init is None else torch.as_tensor(init, dtype=torch.float64).clone()
    if lam.shape != (k,) or not bool(torch.isfinite(lam).all()):
        raise ValueError(f"fit_lambdas: init must be {k} finite floats, got {lam.tolist()}")
    dual, w, mu = evaluate(lam)
    it = 0
    while True:
        grad = mu - target
        error = float(grad.abs().max())
        if error < tol:
            break
        for d in (-grad, lam):
            norm = float(d.norm())
            if norm > 0 and float(((phi - target) @ d).max()) < -1e-9 * scale * norm:
                raise ValueError(f"fit_lambdas: target moments {target.tolist()} are unreachable: they lie outside "
                                 f"the convex hull of the {phi.shape[0]} observed feature vectors (every sample has "
                                 f"d·(φ − μ̄) < 0 for d = {(d / norm).tolist()})")
        if it == max_iter:
            raise RuntimeError(f"fit_lambdas: no convergence after {max_iter} Newton iterations: max|μ̂ − μ̄| = "
                               f"{error:.3e} (tol {tol:g}), λ = {lam.tolist()}, ESS = {_ess(w, counts):.1f}; the "
                               f"moments may sit on the boundary of what the samples can reach")
        centered = phi - mu
        hess = centered.T @ (w[:, None] * centered)
        # A tiny ridge keeps the solve defined when features are collinear under the current weights.
        step = torch.linalg.solve(hess + 1e-12 * (float(hess.diagonal().max()) + 1e-300) * torch.eye(k,
                                  dtype=torch.float64), -grad)
        if not float(grad @ step) < 0:  # not a descent direction (numerically singular H): use −∇L.
            step = -grad
        change = float((centered @ step).abs().max())
        if change > max_log_change:
            step = step * (max_log_change / change)
        slope = float(grad @ step)
        for _ in range(60):  # backtracking (Armijo) on the convex dual
            new_dual, new_w, new_mu = evaluate(lam + step)
            if new_dual <= dual + 1e-4 * slope:
                break
            step, slope = 0.5 * step, 0.5 * slope
        else:
            raise RuntimeError(f"fit_lambdas: line search failed at iteration {it}: max|μ̂ − μ̄| = {error:.3e}, "
                               f"λ = {lam.tolist()}, ESS = {_ess(w, counts):.1f}")
        lam, dual, w, mu = lam + step, new_dual, new_w, new_mu
        it += 1

    ess = _ess(w, counts)
    if ess < min_ess:
        raise RuntimeError(f"fit_lambdas: effective sample size collapsed to {ess:.2f} < min_ess = {min_ess:g} "
                           f"(N = {float(counts.sum()):g} draws) at λ = {lam.tolist()}: the moments rest on too few "
                           f"samples; draw more, or use a proposal closer to the target")
    # Per draw, a row's weight w is shared by its c copies: Σ_draws (w/c)²(φ − μ̂)² = Σ_rows w²/c (φ − μ̂)².
    stderr = torch.sqrt((w[:, None] ** 2 / counts[:, None] * (phi - mu) ** 2).sum(0))
    return LambdaFit(lambdas=lam, moments=mu, target=target, moment_stderr=stderr, error=error, iterations=it,
                     ess=ess)


def _ess(w_normalised: torch.Tensor, counts: torch.Tensor) -> float:
    """(Σ w)²/Σ w² over the expanded draws: a row of normalised weight w stands for c draws of weight w/c."""
    return float(1.0 / (w_normalised ** 2 / counts).sum())


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

