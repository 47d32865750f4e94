"""Fitting the λ of a distributional target p_λ(x) ∝ a(x) exp(λ·φ(x)) so that E_p[φ] = μ̄ (GDC, Khalifa et al.
2021; docs/method.md §1). The scorers that use it live in ``fdpg_scale.targets.energy``.

p_λ(x) ∝ a(x) exp(λ·φ(x)) is the max-entropy / min-KL(·‖a) distribution with moments E_p[φ] = μ̄. Its dual
is the convex function

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LambdaFit", "fit_lambdas"]


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
