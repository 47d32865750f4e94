"""Per-token log-probs from given logits: Triton kernels, autograd.Function, functional API.

For heads that cannot be fused (the logits already exist); ``linear_logprobs.py`` is the fused op.

Math (derivation in kernels/reference.py). Row r with logits z_r ∈ R^V, target t_r, temperature T:

    forward   one pass over the row, blocks of BLOCK_V columns, with an online log-sum-exp:
                  s = z/T;  m' = max(m, max_block s);  S' = S·exp(m − m') + Σ_block exp(s − m')
              (−inf logits are allowed: masked tokens; a target at −inf gets −inf, as in torch)
              lse = m + log S;  out = s_t − lse   (0 when t == ignore_index);  saves lse [N] only
    backward  one pass per row:  dz_v = g·(1[v = t] − exp(s_v − lse)) / T   (g = upstream gradient)

Everything is accumulated in fp32 (loads are cast to fp32 at once: the interpreter's bf16 arithmetic is
wrong, kernels/README.md); the gradient is stored in the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_utils import check_triton_device, is_interpreted, resolve_impl
from .reference import IGNORE_INDEX, check_token_inputs, token_logprobs_torch

# Fixed block used when the kernels run in the interpreter (autotune needs a GPU driver there).
INTERPRETER_BLOCK_V = 1024
_GPU_CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv in (1024, 2048, 4096) for w in (4, 8)]


# --------------------------------------------------------------------------------------------------------
# Layer 1: kernels and launchers
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _token_fwd_kernel(
    # pointers
    Z_ptr, T_ptr, OUT_ptr, LSE_ptr,
    # shapes and strides
    V, stride_zn,
    # constants
    inv_t, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z_ptr + row * stride_zn
    tgt = tl.load(T_ptr + row)
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        # Masked-out logits (−inf, e.g. banned tokens) may fill a whole block: while the running max is
        # still −inf, shift by 0 instead (exp(−inf − (−inf)) would be NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = tgt != ignore_index
    picked = tl.load(z_row + tl.where(valid, tgt, 0)).to(tl.float32) * inv_t
    tl.store(LSE_ptr + row, lse)
    tl.store(OUT_ptr + row, tl.where(valid, picked - lse, 0.0))


@triton.jit
def _token_bwd_kernel(
    # pointers
    Z_ptr, T_ptr, LSE_ptr, G_ptr, DZ_ptr,
    # shapes and strides
    V, stride_zn, stride_dn,
    # constants
    inv_t, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(T_ptr + row)
    lse = tl.load(LSE_ptr + row)
    live = tgt != ignore_index
    gs = tl.where(live, tl.load(G_ptr + row) * inv_t, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(Z_ptr + row * stride_zn + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        # An ignored row gets exact zeros: gs = 0 alone gives 0·NaN = NaN when the row holds a NaN.
        dz = tl.where(live, gs * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(x - lse)), 0.0)
        tl.store(DZ_ptr + row * stride_dn + cols, dz.to(DZ_ptr.dtype.element_ty), mask=mask)


_token_fwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["V"])(_token_fwd_kernel)
_token_bwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["V"])(_token_bwd_kernel)


def _launch(kernel, tuned, n_rows: int, block_v: int | None, *args) -> None:
    """One program per row; the interpreter gets a fixed block (autotune is broken there)."""
    if is_interpreted(kernel) or block_v is not None:
        kernel[(n_rows,)](*args, BLOCK_V=block_v or INTERPRETER_BLOCK_V)
    else:
        tuned[(n_rows,)](*args)


def token_logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, params: "TokenLogprobsParams"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (last dim contiguous), targets [N] int64 -> (out [N] float32, lse [N] float32)."""
    n_rows, vocab = logits.shape
    # NaN-filled so that an element a kernel failed to write cannot pass as a result.
    out = torch.full((n_rows,), float("nan"), dtype=torch.float32, device=logits.device)
    lse = torch.full((n_rows,), float("nan"), dtype=torch.float32, device=logits.device)
    if n_rows:
        _launch(_token_fwd_kernel, _token_fwd_tuned, n_rows, params.block_v,
                logits, targets, out, lse, vocab, logits.stride(0), 1.0 / params.temperature,
                params.ignore_index)
    return out, lse


def token_logprobs_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                            grad_out: torch.Tensor, params: "TokenLogprobsParams") -> torch.Tensor:
    """-> d logits [N, V] in logits' dtype, for upstream gradient grad_out [N]."""
    n_rows, vocab = logits.shape
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad_out.to(torch.float32).contiguous()
    if n_rows:
        _launch(_token_bwd_kernel, _token_bwd_tuned, n_rows, params.block_v,
                logits, targets, lse, g, dlogits, vocab, logits.stride(0), dlogits.stride(0),
                1.0 / params.temperature, params.ignore_index)
    return dlogits


# --------------------------------------------------------------------------------------------------------
# Layer 2: autograd.Function with a frozen params dataclass
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLogprobsParams:
    """Constants of one token_logprobs call."""

    temperature: float = 1.0
    """Softmax temperature T > 0: log softmax(z / T)."""
    ignore_index: int = IGNORE_INDEX
    """Targets equal to this get log-prob 0 and no gradient."""
    block_v: int | None = None
    """Columns per block (a power of two); None: autotuned on GPU, INTERPRETER_BLOCK_V in the interpreter."""


class TokenLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, params: TokenLogprobsParams) -> torch.Tensor:
        out, lse = token_logprobs_forward(logits, targets, params)
        ctx.save_for_backward(logits, targets, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        return token_logprobs_backward(logits, targets, lse, grad_out, ctx.params), None, None


# --------------------------------------------------------------------------------------------------------
# Layer 3: functional API
# --------------------------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   impl: str = "auto", check_targets: bool | None = None) -> torch.Tensor:
    """log softmax(logits / T)[target] per token.

    logits [..., V] (any float dtype), targets [...] int64 -> float32 [...]; targets == -100 give 0 and
    no gradient. Differentiable w.r.t. logits (gradient in logits' dtype). Naive equivalent:
        torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None]).squeeze(-1)
    impl: "auto" (Triton on CUDA tensors, the chunked torch reference elsewhere), "triton" (on CPU tensors
    only through the Triton interpreter, TRITON_INTERPRET=1 at import), "torch" (kernels/reference.py).
    check_targets: check that every target is in [0, V) or -100 (ValueError otherwise). None (default): on
    CPU tensors only, where it costs no sync; on a GPU it would stall the host once per call, so there it is
    a debugging option (True), and an out-of-range target is the caller's bug.
    """
    impl = resolve_impl(impl, logits)
    if impl == "torch":
        if check_targets:
            check_token_inputs(logits, targets, temperature, check_targets=True)
        return token_logprobs_torch(logits, targets, temperature=temperature)
    check_triton_device(_token_fwd_kernel, "logits", logits)
    targets, temperature = check_token_inputs(logits, targets, temperature, check_targets=check_targets)
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if z.shape[1] > 1 and z.stride(1) != 1:
        z = z.contiguous()
    params = TokenLogprobsParams(temperature=temperature)
    return TokenLogprobsTriton.apply(z, targets.reshape(-1).contiguous(), params).reshape(lead)
