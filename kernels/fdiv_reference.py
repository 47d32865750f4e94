"""Torch reference for ``fdiv_weights``: the oracle, the CPU path and the documentation.

Math (f-DPG, Go et al. 2023, Theorem 1; DESIGN.md §1). For one sampled sequence x ~ q with

    log π = Σ_t m_t·log π(x_t|x_<t)      (or given per sequence)       m = the token mask
    log q = Σ_t m_t·log q(x_t|x_<t)      (or given per sequence)
    log P = Σ_t m_t·log a(x_t|x_<t) + log_scores     (or log P(x) given per sequence, + log_scores if any)

    log t = clamp(log π − (log P − log Z), −bound, +bound)        t = π(x)/p(x), p = P/Z  (bound below)
    r     = −f′(t)                      (clamped to [−clip, clip] only when ``clip`` is given)
    ρ     = exp(log π − log q)          the importance ratio π/q
    w     = ρ·(−(r − B)) = ρ·(B − r)     B = the baseline

The trainer minimises mean(w · log π_θ(x)) with w detached, so

    E_q[w ∇log π] = E_q[(π/q) f′(π/p) ∇log π] + B·E_q[(π/q) ∇log π] = ∇D_f(π‖p) + B·∇Σ_x π(x) = ∇D_f(π‖p):

the baseline term vanishes because it sits inside the importance ratio (Σ_x π = 1 for every θ).

Zero-probability samples: a sample outside the target's support has log P = −inf, so log t = +inf and e.g.
rkl's f′ = log t + 1 would be inf (and 0·inf = NaN in the loss). log t is therefore clamped to ±bound with

    bound = LOG_T_BOUND / max(1, |κ|),   LOG_T_BOUND = 80,

κ the rate of the exponential in the divergence's f′ (f′ ∝ expm1(κ·log t): kl −1, chi2 −2, rchi2 1,
hellinger −½, alpha α−1; rkl, tv and js have none, κ = 0). Then |κ·log t| ≤ 80 and every f′ is finite in
float32 at the bound (at most 2·e^80 ≈ 1.1e35 < 3.4e38, or e^80/|α−1| for alpha): such a sample gets the
maximal finite penalty instead of inf. A plain ±80 would not do: chi2's f′ = 1 − e^(−2 log t) is −inf in
float32 at log t = −80, and alpha's at |α−1|·80 > 88.7 (α > 2.1 or α < −0.1). Sequence ratios beyond e^±80
are indistinguishable for any trainer anyway. The weight ρ·(B − r) can still overflow when ρ is itself huge
(off-policy samples): that is the importance ratio's own variance problem and is reported, not hidden.
NaN inputs stay NaN (the clamp never hides them).

Weight arithmetic: w = ρ·(B − r) is formed as a plain product, because exp(log ρ) keeps full relative precision
and the product overflows only when the true |w| is beyond float32's range, where no representation helps.
Evaluating it as sign·exp(log ρ + log|B − r|) everywhere would cost relative precision (exp turns the
absolute rounding of its argument, up to ~|arg|·6e-8 ≈ 1e-5 at |arg| ≈ 170, into relative error), so log
space is used only where ρ itself overflows (log ρ > 88.7) yet the product may not, which also maps the
one hazard of the plain form, inf·0 = NaN, to the correct 0 (a zero coefficient B − r gives 0 unless ρ is
NaN).

Everything is computed in float32 (inputs are cast first: bf16/fp16 per-token log-probs are upcast before
the sum), exactly as the Triton kernel does, so the two agree to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpg_scale.core.divergences import Divergence, get_divergence

__all__ = ["LOG_T_BOUND", "FDivWeights", "FDivInputs", "check_fdiv_inputs", "fdiv_weights_torch", "log_t_bound"]

LOG_T_BOUND = 80.0
"""|κ·log t| is clamped to this: f′ stays finite in float32 for every divergence (see the module docstring)."""

def log_t_bound(divergence: Divergence) -> float:
    """LOG_T_BOUND / max(1, |κ|): the |log t| up to which this divergence's f′ is finite in float32.

    κ = ``divergence.exp_rate``: f′(log t) grows like exp(κ·log t) (chi2: −2, alpha: α − 1, ...).
    """
    return LOG_T_BOUND / max(1.0, abs(divergence.exp_rate))


@dataclass(frozen=True)
class FDivWeights:
    """Per-sequence outputs of ``fdiv_weights``; every field is a detached float32 tensor [B]."""

    weight: torch.Tensor
    """(π/q)·(−(r − B)): the coefficient of log π in the loss mean(weight · log π)."""
    pseudo_reward: torch.Tensor
    """r = −f′(π/p), clamped to [−clip, clip] when clip was given (before the baseline is subtracted)."""
    importance_ratio: torch.Tensor
    """π(x)/q(x) = exp(log π − log q)."""
    log_t: torch.Tensor
    """log(π(x)/p(x)) = log π − (log P − log Z), clamped to ±log_t_bound(divergence)."""


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
    divergence: Divergence
    clip: float | None
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
                      log_scores=None) -> FDivInputs:
    """Check shapes, dtypes and devices of ``fdiv_weights``'s arguments (one-line errors naming them)."""
    _check_logprob("logp_pi", logp_pi, None, None)
    batch, device = logp_pi.shape[0], logp_pi.device
    _check_logprob("logp_q", logp_q, batch, device)
    _check_logprob("log_target", log_target, batch, device)
    divergence = get_divergence(divergence)
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
    return FDivInputs(
        logp_pi=logp_pi.detach(), logp_q=logp_q.detach(), log_target=log_target.detach(),
        mask=None if mask is None else mask.detach(),
        log_scores=None if log_scores is None else log_scores.detach(),
        log_z=_broadcast_scalar("log_z", log_z, batch, device),
        baseline=_broadcast_scalar("baseline", baseline, batch, device),
        divergence=divergence, clip=clip, batch=batch, tokens=tokens)


def _sequence_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B] -> float32 [B]; [B, T] -> float32 Σ_t over tokens where mask ≠ 0 (masked entries never read)."""
    x = x.to(torch.float32)
    if x.dim() == 1:
        return x
    if mask is not None:
        # where, not mask·x: padding positions may hold -inf or NaN, and 0·(-inf) = NaN.
        x = torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(dim=1)


def _weight(log_ratio: torch.Tensor, ratio: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """ρ·coeff, in log space only where ρ = exp(log_ratio) overflowed (see the module docstring)."""
    # A zero coefficient gives weight 0 even where ρ = inf (the true ρ is finite, only unrepresentable);
    # a NaN ρ stays NaN.
    zero = (coeff == 0) & ~torch.isnan(ratio)
    log_space = torch.sign(coeff) * torch.exp(log_ratio + torch.log(torch.where(zero, 1.0, coeff.abs())))
    return torch.where(zero, 0.0, torch.where(torch.isinf(ratio), log_space, ratio * coeff))


def fdiv_weights_torch(inputs: FDivInputs) -> FDivWeights:
    """The f-DPG per-sequence weights from checked inputs (see the module docstring for the math)."""
    logp_pi = _sequence_sum(inputs.logp_pi, inputs.mask)
    logp_q = _sequence_sum(inputs.logp_q, inputs.mask)
    log_p = _sequence_sum(inputs.log_target, inputs.mask)
    if inputs.log_scores is not None:
        log_p = log_p + inputs.log_scores.to(torch.float32)
    bound = log_t_bound(inputs.divergence)
    log_t = (logp_pi - (log_p - inputs.log_z)).clamp(-bound, bound)
    reward = -inputs.divergence.f_prime(log_t)
    if inputs.clip is not None:
        reward = reward.clamp(-inputs.clip, inputs.clip)
    log_ratio = logp_pi - logp_q
    ratio = torch.exp(log_ratio)
    weight = _weight(log_ratio, ratio, inputs.baseline - reward)
    return FDivWeights(weight=weight, pseudo_reward=reward, importance_ratio=ratio, log_t=log_t)
