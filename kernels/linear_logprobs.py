"""Fused linear head + per-token log-probs: Triton kernels, autograd.Function, functional API.

Never materialises the [N, V] logits: they exist only as [BLOCK_N, BLOCK_V] tiles in registers.

Math (derivation in kernels/reference.py). Token n, hidden h_n ∈ R^H, head W ∈ R^{V×H}, bias b, target
t_n, temperature T, logits z_n = (W h_n + b)/T:

forward  (grid: token blocks × vocab splits)
    for each vocab tile [v0, v0+BLOCK_V) of this split:
        acc = Σ_{H blocks} h[BLOCK_N, BLOCK_K] · W[BLOCK_V, BLOCK_K]ᵀ        (tl.dot, fp32 accumulator)
        z   = (acc + b)/T;  online log-sum-exp per row:
              m' = max(m, max_v z);  S' = S·exp(m − m') + Σ_v exp(z − m')
        pick += z[t] if t falls in the tile
    per split: lse_s = m + log S, pick_s. The launcher combines the splits (a [splits, N] array, tiny):
        lse = logsumexp_s lse_s,  out = Σ_s pick_s − lse   (0 where t == ignore_index)
    Saved for backward: lse [N] only (plus the inputs).
    Ignored tokens (t == ignore_index) read their hidden row as zeros, forward and backward: their output
    is 0 whatever the row holds, and a NaN there (padding) must not reach lse, dz, d hidden or d weight
    (0·NaN = NaN in dzᵀ·h).
    Vocab splits exist so a GPU has enough programs when N is small (N/BLOCK_N programs alone would leave
    most SMs idle); the combine is exact: logsumexp is associative.

backward (grid: token blocks × vocab blocks, one program per [BLOCK_N, BLOCK_V] tile)
    recompute z for the tile (as above), p = exp(z − lse), dz = g/T · (onehot(t) − p) (zero for ignored
    tokens, padded rows and padded columns); then, per H block:
        d hidden[n-block, k-block] += dz · W[v-block, k-block]          (atomic_add, fp32)
        d weight[v-block, k-block] += dzᵀ · h[n-block, k-block]         (atomic_add, fp32)
    and d bias[v-block] += Σ_n dz.
    Why atomics: each tile is recomputed exactly once (3 tile-matmuls per tile: z, dh, dW, the minimum
    for a recompute backward), every program is independent (N/BLOCK_N × V/BLOCK_V of them, enough to
    fill any GPU), and fp32 atomic_add also works in the Triton interpreter. The deterministic alternative
    (a kernel over vocab blocks looping over all token blocks, owning its rows of dW, plus one over token
    blocks owning its rows of dh) recomputes every logit tile twice: 4 tile-matmuls instead of 3. Price of
    atomics: the fp32 summation order of dh and dW is not deterministic (differences at fp32 rounding
    level), and dh/dW live in fp32 buffers that are cast to the input dtype at the end.

Precision: loads are cast to DOT_DTYPE (a constexpr chosen by the launcher) right away. In the interpreter
DOT_DTYPE is always fp32 (its bf16 arithmetic and bf16 tl.dot are wrong, kernels/README.md). On a GPU it is the
input dtype for bf16/fp16 (tensor-core dot with fp32 accumulation) and fp32 with input_precision="ieee" for
fp32 inputs (no silent TF32: log-probs feed importance ratios where 1e-3 errors summed over a sequence
matter). Everything after the dot (lse, softmax, dz) is fp32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_utils import check_triton_device, is_interpreted, resolve_impl
from .reference import IGNORE_INDEX, check_linear_inputs, linear_token_logprobs_torch

# Memory ordering of the backward's atomic adds. Each add is an independent fp32 accumulation that nothing
# reads before the kernel ends, so no ordering is needed and "relaxed" is correct; Triton's default is
# "acq_rel", a fence per atomic. At 8192 tokens × 4096 hidden × 131072 vocab the backward issues about
# 6.9e10 of them, so the ordering may cost more than the tensor-core math; public reports give 1.3–2× from
# "relaxed". It stays "acq_rel" until measured on a GPU (benchmarks/README.md, "GPU"). The switch, for the
# whole process: FDPG_TRITON_ATOMICS=relaxed|acq_rel, read here once at import and logged when set; code
# may also pass LinearLogprobsParams(atomic_sem=...) (scripts/gpu_check.sh times both).
ATOMIC_SEMS = ("acq_rel", "relaxed")
ATOMICS_ENV = "FDPG_TRITON_ATOMICS"


def _atomic_sem_from_env() -> str:
    value = os.environ.get(ATOMICS_ENV)
    if value is None:
        return "acq_rel"
    if value not in ATOMIC_SEMS:
        raise ValueError(f"{ATOMICS_ENV}={value!r}: must be one of {ATOMIC_SEMS}")
    logging.getLogger(__name__).warning("%s=%s: the fused linear log-prob backward uses %s atomic adds",
                                        ATOMICS_ENV, value, value)
    return value


DEFAULT_ATOMIC_SEM = _atomic_sem_from_env()

# Block sizes when interpreting (autotune needs a GPU driver). Small enough that odd test shapes hit
# partial blocks in every dimension, large enough to keep the interpreter's per-op overhead bearable.
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_K": 32}
# Every vocab split spans a multiple of this many columns, so it is a multiple of every BLOCK_V below.
_SPLIT_ALIGN = 256
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                              (64, 256, 32, 4, 4), (128, 128, 32, 4, 4)]
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                              (128, 64, 32, 4, 4)]
]


# --------------------------------------------------------------------------------------------------------
# Layer 1: kernels and launchers
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _logits_tile(
    H_ptr, W_ptr, B_ptr, rows, cols, row_mask, col_mask, HD, stride_hn, stride_hk, stride_wv, stride_wk,
    inv_t, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 tile of (h·Wᵀ + b)/T (padded rows/cols are finite, not meaningful)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, HD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < HD
        h = tl.load(H_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _linear_fwd_kernel(
    # pointers
    H_ptr, W_ptr, B_ptr, T_ptr, PLSE_ptr, PPICK_ptr,
    # shapes
    N, V, HD, V_PER_SPLIT,
    # strides (elements)
    stride_hn, stride_hk, stride_wv, stride_wk,
    # constants
    inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    # Ignored tokens are computed as if their hidden row were zero (their output is 0 anyway): a NaN/inf
    # hidden row that nobody scores (padding) then leaves a finite lse, which the backward relies on.
    live = row_mask & (tgt != ignore_index)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    pick = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = _logits_tile(H_ptr, W_ptr, B_ptr, rows, cols, live, col_mask, HD, stride_hn, stride_hk,
                         stride_wv, stride_wk, inv_t, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        # A tile of only −inf logits (banned tokens via the bias) leaves the running max at −inf: shift by 0
        # then, since exp(−inf − (−inf)) would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
        pick += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    tl.store(PLSE_ptr + split * N + rows, m + tl.log(s), mask=row_mask)
    tl.store(PPICK_ptr + split * N + rows, pick, mask=row_mask)


@triton.jit
def _linear_bwd_kernel(
    # pointers (DH, DW, DB: contiguous fp32 accumulators)
    H_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, G_ptr, DH_ptr, DW_ptr, DB_ptr,
    # shapes
    N, V, HD,
    # strides (elements)
    stride_hn, stride_hk, stride_wv, stride_wk,
    # constants
    inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ATOMIC_SEM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    pid_n = pid // n_vblocks
    pid_v = pid % n_vblocks
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    # Rows that carry a gradient. Every load of hidden and every dz below is masked by this, not only by
    # row_mask: an ignored row's dz is 0·(onehot − p), and 0·NaN = NaN, so a NaN hidden row in padding
    # (left-padded prompts can produce them) would otherwise reach d weight through dzᵀ·h.
    live = row_mask & (tgt != ignore_index)
    lse = tl.load(LSE_ptr + rows, mask=live, other=0.0)
    g = tl.load(G_ptr + rows, mask=live, other=0.0)
    gs = tl.where(live, g * inv_t, 0.0)
    z = _logits_tile(H_ptr, W_ptr, B_ptr, rows, cols, live, col_mask, HD, stride_hn, stride_hk,
                     stride_wv, stride_wk, inv_t, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = gs[:, None] * (onehot - tl.exp(z - lse[:, None]))
    dz = tl.where(live[:, None] & col_mask[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(DB_ptr + cols, tl.sum(dz, 0), mask=col_mask, sem=ATOMIC_SEM)
    dz_d = dz.to(DOT_DTYPE)
    for k0 in range(0, HD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < HD
        if COMPUTE_DH:
            w = tl.load(W_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            dh = tl.dot(dz_d, w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            # Ignored rows add exact zeros: skip their atomics (d hidden starts at zero).
            tl.atomic_add(DH_ptr + rows[:, None] * HD + ks[None, :], dh,
                          mask=live[:, None] & k_mask[None, :], sem=ATOMIC_SEM)
        if COMPUTE_DW:
            h = tl.load(H_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                        mask=live[:, None] & k_mask[None, :], other=0.0)
            dw = tl.dot(tl.trans(dz_d), h.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            tl.atomic_add(DW_ptr + cols[:, None] * HD + ks[None, :], dw,
                          mask=col_mask[:, None] & k_mask[None, :], sem=ATOMIC_SEM)


# The token count N is left out of the autotune keys on purpose: it changes with every batch (packed or
# padded sequences) and re-tuning per distinct N would cost seconds each time; V and H are fixed per model.
_linear_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["V", "HD", "HAS_BIAS"])(_linear_fwd_kernel)
# Autotuning runs the kernel several times: the atomic accumulators must be zeroed before each run.
_linear_bwd_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["V", "HD", "HAS_BIAS", "ATOMIC_SEM"],
                                    reset_to_zero=["DH_ptr", "DW_ptr", "DB_ptr"])(_linear_bwd_kernel)


def _dot_dtype(dtype: torch.dtype, interpreted: bool):
    """tl dtype the tiles are cast to before tl.dot (see the module docstring)."""
    if interpreted or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _blocks(params: "LinearLogprobsParams", interpreted: bool) -> dict | None:
    """Explicit block sizes (interpreter or user-given), or None to autotune."""
    given = {"BLOCK_N": params.block_n, "BLOCK_V": params.block_v, "BLOCK_K": params.block_k}
    if all(v is not None for v in given.values()):
        return given
    if interpreted:
        return {k: (v if v is not None else INTERPRETER_BLOCKS[k]) for k, v in given.items()}
    return None


def _num_splits(n_tok: int, vocab: int, device: torch.device, params: "LinearLogprobsParams") -> int:
    """Vocab splits of the forward grid: enough programs to fill the device, at most one per 256 columns."""
    if params.num_splits is not None:
        want = params.num_splits
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(4 * sms, triton.cdiv(n_tok, 64))
    else:
        want = 2  # the interpreter runs programs one after another: splits only exercise the combine
    return max(1, min(want, triton.cdiv(vocab, _SPLIT_ALIGN)))


def linear_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, params: "LinearLogprobsParams"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> (out [N] float32, lse [N] float32)."""
    n_tok, hd = hidden.shape
    vocab = weight.shape[0]
    interpreted = is_interpreted(_linear_fwd_kernel)
    splits = _num_splits(n_tok, vocab, hidden.device, params)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(vocab, v_per_split)  # no empty split
    # NaN-filled so that a partial a kernel failed to write poisons the output instead of passing.
    part_lse = torch.full((splits, n_tok), float("nan"), dtype=torch.float32, device=hidden.device)
    part_pick = torch.full((splits, n_tok), float("nan"), dtype=torch.float32, device=hidden.device)
    if n_tok:
        args = (hidden, weight, bias if bias is not None else part_lse, targets, part_lse, part_pick,
                n_tok, vocab, hd, v_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                1.0 / params.temperature, params.ignore_index)
        consts = dict(HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(hidden.dtype, interpreted),
                      INPUT_PRECISION="ieee")
        blocks = _blocks(params, interpreted)
        if blocks is not None:
            _linear_fwd_kernel[(triton.cdiv(n_tok, blocks["BLOCK_N"]), splits)](*args, **consts, **blocks)
        else:
            grid = lambda meta: (triton.cdiv(n_tok, meta["BLOCK_N"]), splits)  # noqa: E731
            _linear_fwd_tuned[grid](*args, **consts)
    lse = torch.logsumexp(part_lse, dim=0) if splits > 1 else part_lse[0]
    out = torch.where(targets != params.ignore_index, part_pick.sum(dim=0) - lse, 0.0)
    return out, lse


def linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                             params: "LinearLogprobsParams", need: tuple[bool, bool, bool]):
    """-> (d hidden [N, H], d weight [V, H], d bias [V] | None), each in its input's dtype or None."""
    n_tok, hd = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    interpreted = is_interpreted(_linear_bwd_kernel)
    dev = hidden.device
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dh = torch.zeros((n_tok, hd), dtype=torch.float32, device=dev) if need_h else dummy
    dw = torch.zeros((vocab, hd), dtype=torch.float32, device=dev) if need_w else dummy
    db = torch.zeros((vocab,), dtype=torch.float32, device=dev) if need_b else dummy
    if n_tok and (need_h or need_w or need_b):
        g = grad_out.to(torch.float32).contiguous()
        args = (hidden, weight, bias if bias is not None else dummy, targets, lse, g, dh, dw, db,
                n_tok, vocab, hd, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                1.0 / params.temperature, params.ignore_index)
        consts = dict(HAS_BIAS=bias is not None, COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
                      DOT_DTYPE=_dot_dtype(hidden.dtype, interpreted), INPUT_PRECISION="ieee",
                      ATOMIC_SEM=params.atomic_sem)
        blocks = _blocks(params, interpreted)
        if blocks is not None:
            grid = (triton.cdiv(n_tok, blocks["BLOCK_N"]) * triton.cdiv(vocab, blocks["BLOCK_V"]),)
            _linear_bwd_kernel[grid](*args, **consts, **blocks)
        else:
            grid = lambda meta: (triton.cdiv(n_tok, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
            _linear_bwd_tuned[grid](*args, **consts)
    return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None)


# --------------------------------------------------------------------------------------------------------
# Layer 2: autograd.Function with a frozen params dataclass
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearLogprobsParams:
    """Constants of one linear_token_logprobs call (as ml-cross-entropy's CCEParams)."""

    temperature: float = 1.0
    """Softmax temperature T > 0: log softmax((h·Wᵀ + b) / T)."""
    ignore_index: int = IGNORE_INDEX
    """Targets equal to this get log-prob 0 and no gradient."""
    block_n: int | None = None
    """Tokens per tile (power of two ≥ 16); None: autotuned on GPU, INTERPRETER_BLOCKS when interpreting."""
    block_v: int | None = None
    """Vocab columns per tile (power of two, 16..256)."""
    block_k: int | None = None
    """Hidden elements per tl.dot step (power of two ≥ 16)."""
    num_splits: int | None = None
    """Vocab splits of the forward grid; None: enough programs to fill the GPU (2 when interpreting)."""
    atomic_sem: str = DEFAULT_ATOMIC_SEM
    """Memory ordering of the backward's atomic adds: "acq_rel" (Triton's default) or "relaxed" (see
    ``ATOMICS_ENV``). Default: the process's ``FDPG_TRITON_ATOMICS``, else "acq_rel"."""

    def __post_init__(self):
        if self.atomic_sem not in ATOMIC_SEMS:
            raise ValueError(f"atomic_sem must be one of {ATOMIC_SEMS}, got {self.atomic_sem!r}")
        if self.block_v is not None and (self.block_v > _SPLIT_ALIGN or _SPLIT_ALIGN % self.block_v):
            raise ValueError(f"block_v must be a power of two ≤ {_SPLIT_ALIGN}, got {self.block_v}")


class LinearLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LinearLogprobsParams):
        out, lse = linear_logprobs_forward(hidden, weight, bias, targets, params)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad_out, ctx.params,
                                              ctx.needs_input_grad[:3])
        return dh, dw, db, None, None


# --------------------------------------------------------------------------------------------------------
# Layer 3: functional API
# --------------------------------------------------------------------------------------------------------

def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          impl: str = "auto", check_targets: bool | None = None) -> torch.Tensor:
    """log softmax((hidden·weightᵀ + bias) / T)[target] per token, without materialising [..., V].

    hidden [..., H], weight [V, H] (the lm_head), bias [V] | None, targets [...] int64 -> float32 [...];
    targets == -100 give 0 and no gradient. Differentiable w.r.t. hidden, weight and bias (gradients in
    their dtype) for any upstream gradient. Naive equivalent (materialises the logits):
        torch.log_softmax((hidden @ weight.T + bias).float() / T, -1).gather(-1, targets[..., None])[..., 0]
    impl: "auto" (Triton on CUDA tensors, the chunked torch reference elsewhere), "triton" (on CPU tensors
    only through the Triton interpreter, TRITON_INTERPRET=1 at import), "torch" (kernels/reference.py).
    check_targets: check that every target is in [0, V) or -100 (ValueError otherwise). None (default): on
    CPU tensors only, where it costs no sync; on a GPU it would stall the host once per call (every micro-
    step of training), so there it is a debugging option (True), and an out-of-range target is the
    caller's bug.
    """
    impl = resolve_impl(impl, hidden)
    if impl == "torch":
        if check_targets:
            check_linear_inputs(hidden, weight, targets, bias, temperature, check_targets=True)
        return linear_token_logprobs_torch(hidden, weight, targets, bias=bias, temperature=temperature)
    check_triton_device(_linear_fwd_kernel, "hidden", hidden)
    targets, temperature = check_linear_inputs(hidden, weight, targets, bias, temperature,
                                               check_targets=check_targets)
    lead = hidden.shape[:-1]
    params = LinearLogprobsParams(temperature=temperature)
    out = LinearLogprobsTriton.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                     targets.reshape(-1).contiguous(), params)
    return out.reshape(lead)
