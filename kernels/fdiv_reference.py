"""Torch reference for ``fdiv_weights``: the oracle, the CPU path and the documentation.

Math (f-DPG, Go et al. 2023, arXiv 2302.08215, Theorem 1; docs/method.md §3, §7). For one sampled sequence x ~ q with

    log π = Σ_t m_t·log π(x_t|x_<t)      (or given per sequence)       m = the token mask
    log q = Σ_t m_t·log q(x_t|x_<t)      (or given per sequence)
    log P = Σ_t m_t·log a(x_t|x_<t)  + log_scores   (or log P(x) given per sequence, + log_scores if any)

    log t = log π − (log P − log Z)      t = π(x)/p(x), p = P/Z   (no clamp)
    r     = −f′(t)                       (f′ from kernels/f_prime.py; clamped to [−clip, clip] only when
                                          ``clip`` is given)
    ρ     = exp(log π − log q)           the importance ratio π/q
    w     = ρ·(−(r − B)) = ρ·(B − r)     B = the baseline

The trainer minimises mean(w · log π_θ(x)) with w detached, so

    E_q[w ∇log π] = E_q[(π/q) f′(π/p) ∇log π] + B·E_q[(π/q) ∇log π] = ∇D_f(π‖p) + B·∇Σ_x π(x) = ∇D_f(π‖p):

the baseline term vanishes because it sits inside the importance ratio (Σ_x π = 1 for every θ).

Inside the support (log P > −inf) every divergence gets its exact f′ in a stable log-space form: rkl's
f′ = log t + 1 is linear, js's ½(log 2 − softplus(−log t)) is linear at both ends, and the exponential ones
(kl, chi2, rchi2, hellinger, alpha) are c₀ + c₁·exp(κ·log t). The pseudo-reward field reports r honestly:
±inf where r itself is beyond float32 (kl at log t < −88.7: r = e^{−log t}).

Outside the support (log P = −inf, so t = +inf and log t is reported as +inf):
  * f′ has a finite limit at t → ∞ for kl (0), tv (½), js (½ log 2), chi2 (1), hellinger (1) and alpha with
    α < 1 (1/(1 − α)): r is exactly −(that limit). It is the true pseudo-reward of the sample (the gradient of
    D_f(π‖p) with p(x) = 0 is π(x)·f′(∞)·∇log π(x)), not an approximation.
  * f′ → +∞ for rkl, rchi2 and alpha with α > 1: D_f(π‖p) = +∞ as soon as π puts mass outside the support, and
    no finite pseudo-reward is exact. The caller chooses one: ``outside_support_reward`` = the r used for such
    samples (a penalty, e.g. −20); None (default) makes such a sample a ValueError naming the argument.
    ``outside_support_reward`` is not used by the finite-limit divergences above (their limit is exact).
    For comparison: naver/disco's f-DPG losses (disco/tuners/losses/*.py) apply f′ to log t = +inf as it is,
    so its rkl pseudo-reward is −inf for a P = 0 sample (BooleanScorer gives log 0) and the loss is not finite;
    it has neither a clamp nor a penalty.

Weight arithmetic: w = ρ·(B − r) is a plain product where ρ and B − r are finite, because exp(log ρ) keeps
full relative precision and the product overflows only when the true |w| is beyond float32's range. Two
cases leave the plain product:
  * ρ outside float32's normal range (log ρ > 88.7: inf; log ρ < −87.3: a subnormal or 0, which would lose
    the weight of a huge finite r) with B − r finite: w = sign(B − r)·exp(log ρ + log|B − r|), and a zero
    coefficient gives 0 (never inf·0 = NaN). Log space only there: exp turns the absolute rounding of its
    argument (~|arg|·6e-8) into relative error, which the plain product does not have.
  * r overflowed (B − r = ±inf) for an exponential f′ = c₀ + c₁·exp(κ·log t): w = ρ·(B + c₀) + c₁·exp(E) with
    E = log ρ + κ·log t = (1 + κ)·log π − log q − κ·(log P − log Z), the two terms added in log space. For kl
    that is ρB − exp(log p − log q): finite wherever the true weight is, although f′ = −e^{−log t} is not.
    (Written from the inputs, E needs no inf − inf when π = 0.) For rkl and js, r overflows only at
    log t = −inf, i.e. π(x) = 0, where ρ = 0 and w = 0 (π log π → 0).
NaN inputs stay NaN; finite inputs never give a NaN weight.

Everything is computed in float32 (inputs are cast first: bf16/fp16 per-token log-probs are upcast before
the sum), exactly as the Triton kernel does, so the two agree to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .f_prime import FPrimeSpec, f_prime_torch, fprime_spec

__all__ = ["FDivWeights", "FDivInputs", "check_fdiv_inputs", "fdiv_weights_torch", "outside_reward",
           "outside_support_error"]


@dataclass(frozen=True)
class FDivWeights:
    """Per-sequence outputs of ``fdiv_weights``; every field is a detached float32 tensor [B]."""

    weight: torch.Tensor
    """(π/q)·(−(r − B)): the coefficient of log π in the loss mean(weight · log π)."""
    pseudo_reward: torch.Tensor
    """r = −f′(π/p), clamped to [−clip, clip] when clip was given (before the baseline is subtracted); ±inf
    where r is beyond float32; outside the support the limit −f′(∞) or ``outside_support_reward``."""
    importance_ratio: torch.Tensor
    """π(x)/q(x) = exp(log π − log q)."""
    log_t: torch.Tensor
    """log(π(x)/p(x)) = log π − (log P − log Z), unclamped; +inf for samples outside the support (log P = −inf)."""


@dataclass(frozen=True)
class FDivInputs:
    """Checked, normalised inputs shared by both implementations (nothing here reads tensor values)."""

    logp_pi: torch.Tensor
    """[B] or [B, T], any float dtype."""
    logp_q: torch.Tensor
    """[B] or [B, T], any float dtype."""
    log_target: torch.Tensor
    """[B] or [B, T], any float dtype."""
    mask: torch.Tensor | None
    """[B, T] (bool, int or float; nonzero = counted) or None (every token counts)."""
    log_scores: torch.Tensor | None
    """[B] or None."""
    log_z: torch.Tensor
    """float32, [B] or [1] (broadcast)."""
    baseline: torch.Tensor
    """float32, [B] or [1] (broadcast)."""
    divergence: FPrimeSpec
    """Which f′ (kernel id and α)."""
    clip: float | None
    outside_support_reward: float | None
    """r for samples with log P = −inf where f′(∞) = +∞ (None: such a sample is an error)."""
    batch: int
    tokens: int
    """T of the per-token inputs (0 when every input is per sequence)."""


def _describe(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_logprob(name: str, x, batch: int | None, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B] (per sequence) or [B, T] (per token), got {_describe(x)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has {_describe(x)} but logp_pi has B = {batch} sequences")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but logp_pi is on {device}")


def _broadcast_scalar(name: str, value, batch: int, device) -> torch.Tensor:
    """A python number, a one-element tensor or a [B] tensor -> float32 [1] or [B] on ``device``.

    Python numbers become a device tensor through torch.full (a fill kernel, no host-to-device copy or sync).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.full((1,), float(value), dtype=torch.float32, device=device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logp_pi is on {device}")
    if value.numel() == 1 and value.dim() <= 1:
        return value.detach().reshape(1).to(torch.float32)
    if value.dim() == 1 and value.shape[0] == batch:
        return value.detach().to(torch.float32)
    raise ValueError(f"{name} must be a scalar, a 0-d tensor or [B] = [{batch}], got {_describe(value)}")


def check_fdiv_inputs(logp_pi, logp_q, log_target, log_z, divergence, *, baseline=0.0, clip=None, mask=None,
                      log_scores=None, outside_support_reward=None) -> FDivInputs:
    """Check shapes, dtypes and devices of ``fdiv_weights``'s arguments (one-line errors naming them)."""
    _check_logprob("logp_pi", logp_pi, None, None)
    batch, device = logp_pi.shape[0], logp_pi.device
    _check_logprob("logp_q", logp_q, batch, device)
    _check_logprob("log_target", log_target, batch, device)
    divergence = fprime_spec(divergence)
    per_token = [(n, x) for n, x in (("logp_pi", logp_pi), ("logp_q", logp_q), ("log_target", log_target))
                 if x.dim() == 2]
    tokens = per_token[0][1].shape[1] if per_token else 0
    for name, x in per_token:
        if x.shape[1] != tokens:
            raise ValueError(f"per-token inputs disagree on T: {per_token[0][0]} has "
                             f"{_describe(per_token[0][1])}, {name} has {_describe(x)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if not per_token:
            raise ValueError(f"mask ({_describe(mask)}) given but logp_pi, logp_q and log_target are all "
                             f"per sequence [B]; the mask is for per-token [B, T] inputs")
        if tuple(mask.shape) != (batch, tokens):
            raise ValueError(f"mask must be [B, T] = [{batch}, {tokens}] like {per_token[0][0]}, "
                             f"got {_describe(mask)}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool, int or float, got dtype {mask.dtype}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but logp_pi is on {device}")
    if log_scores is not None:
        if not isinstance(log_scores, torch.Tensor):
            raise TypeError(f"log_scores must be a torch.Tensor, got {type(log_scores).__name__}")
        if not log_scores.is_floating_point():
            raise TypeError(f"log_scores must be a floating-point tensor, got dtype {log_scores.dtype}")
        if tuple(log_scores.shape) != (batch,):
            raise ValueError(f"log_scores must be [B] = [{batch}], got {_describe(log_scores)}")
        if log_scores.device != device:
            raise ValueError(f"log_scores is on {log_scores.device} but logp_pi is on {device}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise TypeError(f"clip must be None or a float > 0, got {type(clip).__name__}")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be None or a finite float > 0, got {clip!r}")
        clip = float(clip)
    if outside_support_reward is not None:
        if isinstance(outside_support_reward, bool) or not isinstance(outside_support_reward, (int, float)):
            raise TypeError(f"outside_support_reward must be None or a float, got "
                            f"{type(outside_support_reward).__name__}")
        if not math.isfinite(outside_support_reward):
            raise ValueError(f"outside_support_reward must be None or a finite float, got {outside_support_reward!r}")
        outside_support_reward = float(outside_support_reward)
    return FDivInputs(
        logp_pi=logp_pi.detach(), logp_q=logp_q.detach(), log_target=log_target.detach(),
        mask=None if mask is None else mask.detach(),
        log_scores=None if log_scores is None else log_scores.detach(),
        log_z=_broadcast_scalar("log_z", log_z, batch, device),
        baseline=_broadcast_scalar("baseline", baseline, batch, device),
        divergence=divergence, clip=clip, outside_support_reward=outside_support_reward, batch=batch,
        tokens=tokens)


def _sequence_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B] -> float32 [B]; [B, T] -> float32 Σ_t over tokens where mask ≠ 0 (masked entries never read)."""
    x = x.to(torch.float32)
    if x.dim() == 1:
        return x
    if mask is not None:
        # where, not mask·x: padding positions may hold -inf or NaN, and 0·(-inf) = NaN.
        x = torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(dim=1)


def outside_reward(inputs: FDivInputs) -> float:
    """r for a sample outside the support: −f′(∞) where finite, else ``outside_support_reward`` (−inf if None:
    the true value, only ever seen by the caller if it skips ``outside_support_error``)."""
    limit = inputs.divergence.limit_at_infinity
    if limit is not None:
        return -limit
    return float("-inf") if inputs.outside_support_reward is None else inputs.outside_support_reward


def outside_support_error(inputs: FDivInputs, log_t: torch.Tensor) -> None:
    """Raise if a sample lies outside the support (log t = +inf) where f′(∞) = +∞ and no
    ``outside_support_reward`` was given. Only then does it read a value (one host sync)."""
    if inputs.divergence.limit_at_infinity is not None or inputs.outside_support_reward is not None:
        return
    n = int(torch.isposinf(log_t).sum())
    if n:
        raise ValueError(f"{n} sample(s) lie outside the target's support (log P = −inf, log t = +inf), where "
                         f"divergence {inputs.divergence.name!r} has f′ = +∞ (D_f is infinite): pass "
                         f"outside_support_reward= (the pseudo-reward r for such samples; config key "
                         f"divergence.outside_support_reward)")


def _signed_exp_sum(s1: torch.Tensor, a: torch.Tensor, s2: float, b: torch.Tensor) -> torch.Tensor:
    """s1·eᵃ + s2·eᵇ without overflowing on the way: e^m·(s1·e^{a−m} + s2·e^{b−m}), m = max(a, b)."""
    m = torch.maximum(a, b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)   # a term of e^±inf: no ±inf − ±inf = NaN
    inner = s1 * torch.exp(a - m) + s2 * torch.exp(b - m)
    return torch.sign(inner) * torch.exp(m + torch.log(inner.abs()))


def _weight(inputs: FDivInputs, log_pi, log_q, log_p_norm, log_ratio, ratio, coeff) -> torch.Tensor:
    """w = ρ·coeff, coeff = B − r, in log space only where ρ or r overflowed (see the module docstring)."""
    # ρ = inf or below float32's normal range (0 or a subnormal with few significant bits) with a finite
    # coefficient: log space. A zero coefficient gives 0 (the true ρ is finite, only unrepresentable); a NaN ρ
    # stays NaN through the plain product.
    zero = coeff == 0
    log_space = torch.sign(coeff) * torch.exp(log_ratio + torch.log(torch.where(zero, 1.0, coeff.abs())))
    outside_normal = torch.isinf(ratio) | (ratio < torch.finfo(torch.float32).tiny)
    w = torch.where(outside_normal, torch.where(zero, 0.0, log_space), ratio * coeff)
    # r = ±inf: f′ itself overflowed.
    form = inputs.divergence.exp_form
    if form is None:       # rkl, js (tv never overflows): only at log t = −inf, i.e. π = 0 and ρ = 0
        huge = torch.where(ratio == 0, 0.0, ratio * coeff)
    else:                  # ρ·(B + c₀) + c₁·exp((1 + κ) log π − log q − κ log p)
        lead = 1.0 + form.kappa
        e = (0.0 if lead == 0.0 else lead * log_pi) - log_q - form.kappa * log_p_norm
        b_c0 = inputs.baseline + form.c0
        a = log_ratio + torch.log(b_c0.abs())
        huge = _signed_exp_sum(torch.sign(b_c0).expand_as(a), a, math.copysign(1.0, form.c1),
                               e + math.log(abs(form.c1)))
    return torch.where(torch.isinf(coeff), huge, w)


def fdiv_weights_torch(inputs: FDivInputs) -> FDivWeights:
    """The f-DPG per-sequence weights from checked inputs (see the module docstring for the math)."""
    logp_pi = _sequence_sum(inputs.logp_pi, inputs.mask)
    logp_q = _sequence_sum(inputs.logp_q, inputs.mask)
    log_p = _sequence_sum(inputs.log_target, inputs.mask)
    if inputs.log_scores is not None:
        log_p = log_p + inputs.log_scores.to(torch.float32)
    outside = torch.isneginf(log_p)
    log_p_norm = log_p - inputs.log_z
    log_t = torch.where(outside, float("inf"), logp_pi - log_p_norm)
    outside_support_error(inputs, log_t)
    reward = torch.where(outside, outside_reward(inputs), -f_prime_torch(log_t, inputs.divergence))
    if inputs.clip is not None:
        reward = reward.clamp(-inputs.clip, inputs.clip)
    log_ratio = logp_pi - logp_q
    ratio = torch.exp(log_ratio)
    weight = _weight(inputs, logp_pi, logp_q, log_p_norm, log_ratio, ratio, inputs.baseline - reward)
    return FDivWeights(weight=weight, pseudo_reward=reward, importance_ratio=ratio, log_t=log_t)
