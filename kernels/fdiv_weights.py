"""f-DPG per-sequence weights in one forward-only Triton launch, and the functional API ``fdiv_weights``.

Math (full derivation in kernels/fdiv_reference.py, which is also the CPU path). For sequence b with token
mask m (nonzero = counted) and the divergence's f′ (given as a function of log t, kernels/f_prime.py):

    log π_b = Σ_t m_bt·logp_pi_bt   (or logp_pi_b)      log q_b likewise      log P_b = Σ_t m_bt·a_bt + s_b
    log t_b = log π_b − (log P_b − log Z_b)             (+inf where log P_b = −inf: outside the support)
    r_b     = −f′(log t_b), or the outside-support r   [clamped to ±clip]
    ρ_b     = exp(log π_b − log q_b)                    w_b = ρ_b·(B − r_b)

so that E_q[w·∇log π] = ∇D_f(π‖p). No clamp on log t: f′ is exact, and where it overflows (kl at
log t < −88.7) the weight is formed in log space from f′ = c₀ + c₁·exp(κ·log t) (see the reference).
Kernel layout: one program per BLOCK_B sequences; it walks the T axis in BLOCK_T columns, loads the
[BLOCK_B, BLOCK_T] tiles of each per-token input (cast to fp32 at once: bf16 arithmetic is wrong in the
interpreter), sums the masked tokens into three fp32 [BLOCK_B] accumulators, then evaluates the scalar chain
above and stores the four outputs. log Z and the baseline are read through pointers with a stride (0 = one
value broadcast), so nothing needs a host sync (one check reads a value only for rkl, rchi2 or alpha α > 1
without ``outside_support_reward``: it raises if a sample lies outside the support).

f′ in the kernel (DIVERGENCE is a tl.constexpr equal to kernels/f_prime.py's KERNEL_IDS; κ a runtime float):

    0 kl        −exp(−lt)                    4 chi2      −expm1(−2 lt)
    1 rkl       lt + 1                       5 rchi2     2·expm1(lt)
    2 tv        ½·sign(lt)                   6 hellinger −expm1(−lt/2)
    3 js        ½(log 2 − softplus(−lt))     7 alpha     expm1(κ lt)/κ, κ = α − 1

Neither tl.math.log1p nor libdevice work in the interpreter, so:
    softplus(x) = max(x, 0) + log(1 + exp(−|x|))      (absolute error ≤ ~1 ulp of log 2; no overflow)
    expm1(x)    = x·(1 + x/2·(1 + x/3·(… (1 + x/11))))  for |x| < 1 (truncation < 1/12! ≈ 2e-9 relative),
                  exp(x) − 1 otherwise (cancellation amplifies exp's rounding by at most e/(e − 1) ≈ 1.6).
Measured in the interpreter against float64 (test_expm1_softplus_precision in tests/kernels/): expm1's
relative error ≤ 2.6e-7 (2.2 ulp; torch.expm1 in fp32: 8.9e-8) and softplus's absolute error ≤ 5.4e-7
(≈ 2 ulp of the result) for fp32 x ∈ [−88, 88]. On a GPU, Triton lowers fp32 tl.exp to the approximate ex2
instruction (x·log2 e rounded first: relative error ≈ |x|·2^−24 more), not measured here (no GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_utils import check_triton_device, resolve_impl
from .f_prime import KERNEL_IDS, FPrimeSpec
from .fdiv_reference import (FDivInputs, FDivWeights, check_fdiv_inputs, fdiv_weights_torch, outside_reward,
                             outside_support_error)

__all__ = ["fdiv_weights", "FDivWeights", "FDivParams", "fdiv_weights_triton"]

DEFAULT_BLOCK_B = 16
DEFAULT_BLOCK_T = 128


# --------------------------------------------------------------------------------------------------------
# Layer 1: kernel and launcher
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log(1 + e^−|x|): the exp never overflows.
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _expm1(x):
    # e^x − 1 keeping relative precision near 0, where exp(x) − 1 cancels: Taylor series to x¹¹ by Horner.
    series = x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0 * (
        1.0 + x / 7.0 * (1.0 + x / 8.0 * (1.0 + x / 9.0 * (1.0 + x / 10.0 * (1.0 + x / 11.0))))))))))
    return tl.where(tl.abs(x) < 1.0, series, tl.exp(x) - 1.0)


@triton.jit
def _expm1_over(y, c):
    # expm1(y)/c, finite wherever the quotient fits: expm1 alone overflows for y > 88.7 even where
    # expm1(y)/c does not (|c| > 1), so above 80 it is sign(c)·exp(y − log|c|) − 1/c (as f_prime.expm1_over).
    big = y > 80.0
    sign_c = tl.where(c > 0.0, 1.0, -1.0)
    scaled = sign_c * tl.exp(tl.where(big, y, 0.0) - tl.log(tl.abs(c))) - 1.0 / c
    return tl.where(big, scaled, _expm1(y) / c)


@triton.jit
def _signed_exp_sum(s1, a, s2, b):
    # s1·e^a + s2·e^b as e^m·(s1·e^(a−m) + s2·e^(b−m)), m = max(a, b): no overflow on the way.
    m = tl.maximum(a, b)
    m = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)   # a term of e^±inf: no inf − inf
    inner = s1 * tl.exp(a - m) + s2 * tl.exp(b - m)
    sign = tl.where(inner > 0.0, 1.0, tl.where(inner < 0.0, -1.0, inner * 0.0))
    return sign * tl.exp(m + tl.log(tl.abs(inner)))


@triton.jit
def _f_prime(lt, kappa, DIVERGENCE: tl.constexpr):
    """f′ as a function of lt = log t; ids are kernels/f_prime.py's KERNEL_IDS."""
    if DIVERGENCE == 0:    # kl
        fp = -tl.exp(-lt)
    elif DIVERGENCE == 1:  # rkl
        fp = lt + 1.0
    elif DIVERGENCE == 2:  # tv; lt·0 keeps a NaN a NaN, as torch.sign does
        fp = tl.where(lt > 0.0, 0.5, tl.where(lt < 0.0, -0.5, lt * 0.0))
    elif DIVERGENCE == 3:  # js
        fp = 0.5 * (0.6931471805599453 - _softplus(-lt))
    elif DIVERGENCE == 4:  # chi2
        fp = -_expm1(-2.0 * lt)
    elif DIVERGENCE == 5:  # rchi2
        fp = 2.0 * _expm1(lt)
    elif DIVERGENCE == 6:  # hellinger
        fp = -_expm1(-0.5 * lt)
    else:                  # alpha
        tl.static_assert(DIVERGENCE == 7, "unknown DIVERGENCE id")
        fp = _expm1_over(kappa * lt, kappa)
    return fp


@triton.jit
def _clamp(x, lo, hi):
    # Comparisons are False for NaN, so a NaN passes through (tl.minimum/maximum may drop it on GPU).
    return tl.where(x > hi, hi, tl.where(x < lo, lo, x))


@triton.jit
def _fdiv_fwd_kernel(
    # pointers: inputs (per-token rows are contiguous along T)
    PI_ptr, Q_ptr, P_ptr, MASK_ptr, SCORES_ptr, LOGZ_ptr, BASE_ptr,
    # pointers: outputs, float32 [B]
    W_ptr, R_ptr, RATIO_ptr, LOGT_ptr,
    # shapes and strides (row strides; LOGZ/BASE stride 0 broadcasts one value)
    B, T, stride_pi, stride_q, stride_p, stride_mask, stride_scores, stride_logz, stride_base,
    # runtime constants: f′ = c0 + c1·exp(kappa·lt) for the exponential ids (kappa = α − 1 for alpha, formed in
    # float64 on the host: α ≈ 1 would round away); outside_r = r for samples with log P = −inf
    kappa, c0, c1, outside_r, clip,
    # compile-time constants
    DIVERGENCE: tl.constexpr, EXP_FORM: tl.constexpr,
    PI_TOK: tl.constexpr, Q_TOK: tl.constexpr, P_TOK: tl.constexpr,   # per-token [B, T] (else [B])
    HAS_MASK: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)

    # Masked token sums (T = 0 when every input is per sequence: the loop does not run).
    acc_pi = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_B], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        keep = row_ok[:, None] & (cols < T)[None, :]
        if HAS_MASK:
            m = tl.load(MASK_ptr + rows[:, None] * stride_mask + cols[None, :], mask=keep, other=0)
            keep = keep & (m != 0)
        # A masked load never reads the padding, whatever it holds (−inf, NaN).
        if PI_TOK:
            x = tl.load(PI_ptr + rows[:, None] * stride_pi + cols[None, :], mask=keep, other=0.0)
            acc_pi += tl.sum(x.to(tl.float32), axis=1)
        if Q_TOK:
            x = tl.load(Q_ptr + rows[:, None] * stride_q + cols[None, :], mask=keep, other=0.0)
            acc_q += tl.sum(x.to(tl.float32), axis=1)
        if P_TOK:
            x = tl.load(P_ptr + rows[:, None] * stride_p + cols[None, :], mask=keep, other=0.0)
            acc_p += tl.sum(x.to(tl.float32), axis=1)
    if PI_TOK:
        log_pi = acc_pi
    else:
        log_pi = tl.load(PI_ptr + rows * stride_pi, mask=row_ok, other=0.0).to(tl.float32)
    if Q_TOK:
        log_q = acc_q
    else:
        log_q = tl.load(Q_ptr + rows * stride_q, mask=row_ok, other=0.0).to(tl.float32)
    if P_TOK:
        log_p = acc_p
    else:
        log_p = tl.load(P_ptr + rows * stride_p, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SCORES:
        log_p += tl.load(SCORES_ptr + rows * stride_scores, mask=row_ok, other=0.0).to(tl.float32)
    log_z = tl.load(LOGZ_ptr + rows * stride_logz, mask=row_ok, other=0.0)
    base = tl.load(BASE_ptr + rows * stride_base, mask=row_ok, other=0.0)

    outside = log_p == float("-inf")
    log_p_norm = log_p - log_z
    log_t = tl.where(outside, float("inf"), log_pi - log_p_norm)
    reward = tl.where(outside, outside_r, -_f_prime(log_t, kappa, DIVERGENCE))
    if HAS_CLIP:
        reward = _clamp(reward, -clip, clip)
    log_ratio = log_pi - log_q
    ratio = tl.exp(log_ratio)
    coeff = base - reward
    # Plain product; log space only where ρ left float32's normal range or r overflowed (reasons in
    # kernels/fdiv_reference.py). ρ = inf or below 2^-126 (0, a subnormal, or flushed on a GPU) with a finite
    # coefficient: log space. A zero coefficient gives 0 (the true ρ is finite, only unrepresentable); a NaN ρ
    # stays NaN through the plain product.
    zero = coeff == 0.0
    sign = tl.where(coeff > 0.0, 1.0, -1.0)
    log_space = sign * tl.exp(log_ratio + tl.log(tl.where(zero, 1.0, tl.abs(coeff))))
    outside_normal = (ratio == float("inf")) | (ratio < 1.1754943508222875e-38)
    weight = tl.where(outside_normal, tl.where(zero, 0.0, log_space), ratio * coeff)
    # r = ±inf: f′ itself overflowed.
    if EXP_FORM:   # w = ρ·(B + c0) + c1·exp((1 + κ) log π − log q − κ log p), summed in log space
        lead = 1.0 + kappa
        e = tl.where(lead == 0.0, 0.0, lead * log_pi) - log_q - kappa * log_p_norm + tl.log(tl.abs(c1))
        b_c0 = base + c0
        s_b = tl.where(b_c0 > 0.0, 1.0, tl.where(b_c0 < 0.0, -1.0, 0.0))
        huge = _signed_exp_sum(s_b, log_ratio + tl.log(tl.abs(b_c0)), tl.where(c1 > 0.0, 1.0, -1.0), e)
    else:          # rkl, js: r overflows only at log t = −inf, i.e. π = 0, ρ = 0, w = 0
        huge = tl.where(ratio == 0.0, 0.0, ratio * coeff)
    weight = tl.where((coeff == float("inf")) | (coeff == float("-inf")), huge, weight)

    tl.store(W_ptr + rows, weight, mask=row_ok)
    tl.store(R_ptr + rows, reward, mask=row_ok)
    tl.store(RATIO_ptr + rows, ratio, mask=row_ok)
    tl.store(LOGT_ptr + rows, log_t, mask=row_ok)


@dataclass(frozen=True)
class FDivParams:
    """Compile-time and scalar constants of one launch."""

    divergence: FPrimeSpec
    """Selects f′ through its ``kernel_id`` (alpha's α goes in as a runtime float)."""
    clip: float | None = None
    """Pseudo-reward clamp ±clip, or None (no clamp)."""
    outside_r: float = float("-inf")
    """r for samples outside the support: −f′(∞), or the caller's outside_support_reward."""
    block_b: int = DEFAULT_BLOCK_B
    """Sequences per program (a power of two)."""
    block_t: int = DEFAULT_BLOCK_T
    """Tokens per step of the T loop (a power of two)."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A [B, T] input with unit stride along T (the kernel's tile addressing assumes it)."""
    return x if x.dim() == 1 or x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def fdiv_weights_triton(inputs: FDivInputs, *, block_b: int = DEFAULT_BLOCK_B,
                        block_t: int = DEFAULT_BLOCK_T) -> FDivWeights:
    """Launch the fused kernel on checked inputs -> FDivWeights (four float32 [B]); one launch, no sync."""
    check_triton_device(_fdiv_fwd_kernel, "logp_pi", inputs.logp_pi)
    params = FDivParams(divergence=inputs.divergence, clip=inputs.clip, outside_r=outside_reward(inputs),
                        block_b=block_b, block_t=block_t)
    kernel_id = params.divergence.kernel_id
    if kernel_id not in KERNEL_IDS.values():
        raise ValueError(f"divergence {params.divergence.name} has no Triton kernel (kernel_id={kernel_id}); "
                         f"use impl='torch'")
    form = params.divergence.exp_form
    kappa, c0, c1 = (0.0, 0.0, 1.0) if form is None else (form.kappa, form.c0, form.c1)
    batch, device = inputs.batch, inputs.logp_pi.device
    # NaN-filled so that an element the kernel failed to write cannot pass as a result.
    outs = [torch.full((batch,), float("nan"), dtype=torch.float32, device=device) for _ in range(4)]
    if batch:
        pi, q, p = _rows(inputs.logp_pi), _rows(inputs.logp_q), _rows(inputs.log_target)
        mask = inputs.mask
        if mask is not None:
            mask = _rows(mask)
            if mask.dtype == torch.bool:  # loaded as bytes: same storage, no copy
                mask = mask.view(torch.uint8)
        scores = inputs.log_scores
        any_token = pi.dim() == 2 or q.dim() == 2 or p.dim() == 2
        dummy = pi  # never read: stands in for absent optional pointers
        _fdiv_fwd_kernel[(triton.cdiv(batch, params.block_b),)](
            pi, q, p, dummy if mask is None else mask, dummy if scores is None else scores,
            inputs.log_z, inputs.baseline,
            *outs,
            batch, inputs.tokens if any_token else 0,
            pi.stride(0), q.stride(0), p.stride(0), 0 if mask is None else mask.stride(0),
            0 if scores is None else scores.stride(0),
            0 if inputs.log_z.shape[0] == 1 else inputs.log_z.stride(0),
            0 if inputs.baseline.shape[0] == 1 else inputs.baseline.stride(0),
            kappa, c0, c1, params.outside_r, 0.0 if params.clip is None else params.clip,
            DIVERGENCE=kernel_id, EXP_FORM=form is not None, PI_TOK=pi.dim() == 2, Q_TOK=q.dim() == 2, P_TOK=p.dim() == 2,
            HAS_MASK=mask is not None, HAS_SCORES=scores is not None, HAS_CLIP=params.clip is not None,
            BLOCK_B=params.block_b, BLOCK_T=params.block_t,
        )
    weight, reward, ratio, log_t = outs
    outside_support_error(inputs, log_t)
    return FDivWeights(weight=weight, pseudo_reward=reward, importance_ratio=ratio, log_t=log_t)


# --------------------------------------------------------------------------------------------------------
# Layer 2 (none): forward-only, the outputs are detached coefficients, so there is no autograd.Function.
# Layer 3: functional API
# --------------------------------------------------------------------------------------------------------

def fdiv_weights(logp_pi: torch.Tensor, logp_q: torch.Tensor, log_target: torch.Tensor,
                 log_z: float | torch.Tensor, divergence, *,
                 baseline: float | torch.Tensor = 0.0, clip: float | None = None,
                 mask: torch.Tensor | None = None, log_scores: torch.Tensor | None = None,
                 outside_support_reward: float | None = None, impl: str = "auto") -> FDivWeights:
    """f-DPG per-sequence weights: loss = mean(weight · log π_θ(x)) has E_q[∇loss] = ∇D_f(π_θ‖p).

    Shapes (B sequences, T tokens; each of the three log-prob inputs independently [B] or [B, T]):
        logp_pi    [B] or [B, T]  log π_θ(x) (per token: summed over the mask inside); any float dtype
        logp_q     [B] or [B, T]  log q(x), the proposal the samples came from
        log_target [B] or [B, T]  log P(x), unnormalised; per token: the base LM's log a(x_t|x_<t)
        log_z      float, 0-d tensor or [B] (one per context)   log Z
        divergence a name (kl, rkl, tv, js, chi2, rchi2, hellinger) or the object
                   ``fdpg_scale.divergences.get_divergence`` returns (read through its ``kernel_id`` and
                   ``alpha_value``; ``alpha`` needs the object, for its α)
        baseline   float, 0-d tensor or [B] (must not depend on the sample x itself)
        clip       None (default: no clipping) or c > 0: pseudo-reward clamped to [−c, c]
        mask       [B, T] bool or 0/1 (nonzero = counted) for the per-token inputs; None: every token counts
        log_scores [B] or None: added to log P (the scorers' log b(x), λ·φ(x) or r(x)/β)
        outside_support_reward  None or a float: the pseudo-reward r of a sample outside the target's
                   support (log P = −inf) for the divergences whose f′ → +∞ there (rkl, rchi2, alpha with
                   α > 1). None: such a sample raises ValueError. The other divergences use their exact
                   limit −f′(∞) (kl 0, tv −½, js −½ log 2, chi2 −1, hellinger −1, alpha α < 1: −1/(1 − α))
                   and do not use this argument.
    Returns FDivWeights with weight, pseudo_reward, importance_ratio, log_t: detached float32 [B].

    Naive equivalent (per-token inputs, all log P > −inf; ``d = get_divergence(divergence)``):
        s = lambda x: torch.where(mask != 0, x.float(), 0.0).sum(-1)     # x [B, T]; a [B] input is used as is
        log_t = s(logp_pi) - (s(log_target) + log_scores - log_z)        # no clamp
        r = -d.f_prime(log_t)                                   # .clamp(-clip, clip) if clip
        ratio = (s(logp_pi) - s(logp_q)).exp()
        weight = ratio * (baseline - r)
    except that the weight is formed in log space where ratio or r overflow float32 and the product need not
    (kernels/fdiv_reference.py), so finite inputs never give a NaN weight.
    impl: "auto" (Triton on CUDA tensors, the torch reference elsewhere), "triton" (on CPU tensors only
    through the Triton interpreter, TRITON_INTERPRET=1 at import), "torch" (kernels/fdiv_reference.py).
    One kernel launch and no host synchronisation on the Triton path, except the outside-support check above
    (one read, only for rkl, rchi2 or alpha α > 1 with outside_support_reward=None).
    """
    impl = resolve_impl(impl, logp_pi) if isinstance(logp_pi, torch.Tensor) else impl
    inputs = check_fdiv_inputs(logp_pi, logp_q, log_target, log_z, divergence, baseline=baseline, clip=clip,
                               mask=mask, log_scores=log_scores, outside_support_reward=outside_support_reward)
    if impl == "torch":
        return fdiv_weights_torch(inputs)
    return fdiv_weights_triton(inputs)
