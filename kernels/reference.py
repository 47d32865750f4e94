"""Torch references for the per-token log-prob ops: the oracle, the CPU path and the documentation.

Math (shared with the Triton kernels in linear_logprobs.py / token_logprobs.py). For one token with
logits z ∈ R^V (z = h·Wᵀ + b for the fused op), temperature T and target t:

    s      = z / T
    lse    = log Σ_v exp(s_v)                       (computed as m + log Σ exp(s_v − m), m = max_v s_v)
    out    = s_t − lse = log softmax(z / T)[t]      (≤ 0)
    ∂out/∂z_v = (1[v = t] − p_v) / T,   p = softmax(s) = exp(s − lse)

With an upstream gradient g (one number per token) the logit gradient is dz = g·(onehot(t) − p)/T, and

    d hidden = dz · W        [N, V]·[V, H]
    d weight = dzᵀ · hidden  [V, N]·[N, H]   (a reduction over tokens)
    d bias   = Σ_tokens dz

Tokens whose target is ``ignore_index`` (−100) get log-prob 0 and no gradient (g is zeroed for them).
Zeroing g alone is not enough: 0·NaN = NaN, so a NaN in an ignored row (padding) would still reach the
gradients. The linear op therefore reads an ignored token's hidden row as zeros (forward and backward,
so its lse stays finite and consistent), and the token op's backward writes exact zeros for its rows.

Memory: neither reference holds the full [N, V] logits; each saves only the per-token lse (and the
inputs). The linear op runs forward and backward over the same tiles, token blocks (``LINEAR_TOKENS``) ×
vocab chunks (``LINEAR_CHUNK_BYTES`` per chunk): the forward keeps an online log-sum-exp across a block's
vocab chunks, and the backward recomputes each tile's logits with the forward's own op on the same shapes,
so exp(z − lse) is consistent with the saved lse to the last bit of fp32 (this matters for extreme
logits). The token op runs over chunks of whole rows ([rows, V], ``CHUNK_BYTES``) both ways. One
preallocated chunk buffer is reused and all arithmetic on it is in place: that, not only the smaller
footprint, is what makes the chunked path faster than the naive one on CPU (the naive path page-faults
through several fresh GB-sized tensors, and a [2048, H]·[H, 2048] tile keeps the GEMM faster than one
[N, H]·[H, V] product does).

Accumulation is in float32 for bf16/fp16/fp32 inputs and in float64 for float64 inputs (so that
``torch.autograd.gradcheck`` can check the custom backward); the output is float32 (float64 for float64
inputs); gradients come back in the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# Bytes of one [rows, V] chunk of token_logprobs (no matmul there: only cache behaviour matters).
CHUNK_BYTES = 32 * 2**20
# The linear op's tiles, forward and backward: token blocks of LINEAR_TOKENS rows (outer loop) × vocab
# chunks of LINEAR_CHUNK_BYTES (inner loop). Swept on the 2-core dev box (AMD EPYC, MKL), N=4096, H=768,
# V=50257 fp32, one process:
#   - forward over [166, V] row chunks (32 MiB, the previous layout): 1.79–1.85 s, of which the matmul is
#     1.75 s; over [2048, 2048] tiles: 1.46–1.52 s (matmul 1.36–1.42 s). A GEMM of many rows against a
#     few thousand vocab rows reuses both operands from cache; a thin [166, H]·[H, V] streams all of W.
#   - backward: 1024..4096 tokens × 1024..4096 columns all within 3%; 8 MiB chunks (1024 columns at 2048
#     tokens) 12% slower. 16 MiB rather than 32: the backward's peak also holds d weight, so every MiB
#     here is a larger share of the memory goal (forward+backward peak 211 MiB at 16 MiB, 233 at 32, both
#     before the backward reused its buffer for W[t]; 187 MiB after).
# The [LINEAR_TOKENS, H] temporaries of the backward count against the memory goal too.
LINEAR_TOKENS = 2048
LINEAR_CHUNK_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------------------
# Input checks shared by every impl (one-line errors naming the argument and the shapes).
# --------------------------------------------------------------------------------------------------------

def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_targets(targets: torch.Tensor, lead_shape: torch.Size, vocab: int, lead_name: str,
                   ignore_index: int, check_values: bool | None = None) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got dtype {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the leading shape of {lead_name} "
                         f"{tuple(lead_shape)}")
    if check_values is None:
        # Reading the values is free on the host but a device-to-host sync on an accelerator, once per call
        # on the training hot path: there it is only done when the caller asks (check_targets=True).
        check_values = targets.device.type == "cpu"
    if check_values and targets.numel() > 0:
        # An out-of-range index would otherwise read out of bounds in the kernel.
        bad = ((targets < 0) & (targets != ignore_index)) | (targets >= vocab)
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(f"targets must lie in [0, {vocab}) or equal {ignore_index} (ignored); "
                             f"found {first}")
    return targets.to(torch.int64)


def check_token_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                       ignore_index: int = IGNORE_INDEX, check_targets: bool | None = None
                       ) -> tuple[torch.Tensor, float]:
    """Validate token_logprobs' inputs; returns (targets as int64, temperature as float).

    check_targets: also check every target value is in [0, V) or ignore_index; None (default) does so for CPU
    tensors only, since on an accelerator reading the values is a host sync."""
    _check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape [..., V], got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got {tuple(logits.shape)}")
    t = _check_targets(targets, logits.shape[:-1], logits.shape[-1], "logits [..., V]", ignore_index,
                       check_targets)
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    return t, _check_temperature(temperature)


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, temperature: float,
                        ignore_index: int = IGNORE_INDEX, check_targets: bool | None = None
                        ) -> tuple[torch.Tensor, float]:
    """Validate linear_token_logprobs' inputs; returns (targets as int64, temperature as float).

    check_targets: as for ``check_token_inputs`` (value check on CPU tensors only by default: no host sync)."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) must equal "
                         f"weight's H={weight.shape[1]} (weight shape {tuple(weight.shape)} is [V, H])")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary dimension, got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden dtype {hidden.dtype} must equal weight dtype {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    t = _check_targets(targets, hidden.shape[:-1], weight.shape[0], "hidden [..., H]", ignore_index,
                       check_targets)
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    return t, _check_temperature(temperature)


# --------------------------------------------------------------------------------------------------------
# Shared chunk math
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefParams:
    """Constants of one reference call (the autograd.Function's non-tensor argument)."""

    temperature: float = 1.0
    """Softmax temperature T > 0: log softmax(z / T)."""
    ignore_index: int = IGNORE_INDEX
    """Targets equal to this get log-prob 0 and no gradient."""
    chunk_tokens: int = 0
    """Token op: rows per [rows, V] chunk (0: from CHUNK_BYTES). Linear op: tokens per block (0: LINEAR_TOKENS)."""
    chunk_vocab: int = 0
    """Linear op: vocab columns per chunk (0: from LINEAR_CHUNK_BYTES)."""

    def rows(self, vocab: int, dtype: torch.dtype) -> int:
        """Token op: tokens per [rows, V] chunk."""
        if self.chunk_tokens > 0:
            return self.chunk_tokens
        return max(1, CHUNK_BYTES // (vocab * _itemsize(dtype)))

    def linear_tiles(self, n_tok: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
        """Linear op, forward and backward: (tokens per block, vocab columns per chunk)."""
        rows = min(self.chunk_tokens if self.chunk_tokens > 0 else LINEAR_TOKENS, max(n_tok, 1))
        cols = self.chunk_vocab if self.chunk_vocab > 0 else max(1, LINEAR_CHUNK_BYTES // (rows * _itemsize(dtype)))
        return rows, min(cols, vocab)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for every low-precision input; float64 stays float64 (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_and_pick_(z: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [n, V] scaled logits (destroyed: becomes exp(z − max)); tgt [n] -> (lse [n], z[tgt] − lse [n]).

    lse = m + log Σ exp(z − m) directly (not recovered from a log_softmax output, which loses ulp(|log p|)
    when the target is far below the max): the backward's exp(z − lse) must sum to 1 to fp32 precision,
    or extreme logits (|z| ~ 1e4) get gradients off by percents.
    """
    picked = z.gather(1, tgt[:, None]).squeeze(1)
    m = z.amax(dim=1)
    z.sub_(m[:, None]).exp_()
    lse = m + z.sum(dim=1).log()
    return lse, picked - lse


def _online_lse_step_(z: torch.Tensor, local_tgt: torch.Tensor, m: torch.Tensor, acc: torch.Tensor,
                      picked: torch.Tensor) -> None:
    """Fold one vocab chunk into a running log-sum-exp, in place.

    z [n, c] scaled logits of columns [v0, v0 + c) (destroyed: becomes exp(z − m_new)); local_tgt [n] = target
    − v0; m, acc, picked [n]: running max, Σ exp(z − m) and target logit over the chunks so far (start at
    −inf, 0, 0). After the last chunk, lse = m + log(acc). A chunk of only −inf logits (banned tokens via
    the bias) leaves m at −inf: the shift is then 0, not −inf, so that no exp(−inf − (−inf)) = NaN appears.
    """
    cols = z.shape[1]
    inside = (local_tgt >= 0) & (local_tgt < cols)
    picked += torch.where(inside, z.gather(1, local_tgt.clamp(0, cols - 1)[:, None]).squeeze(1), 0.0)
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = torch.where(m_new == float("-inf"), 0.0, m_new)
    acc.mul_((m - shift).exp_()).add_(z.sub_(shift[:, None]).exp_().sum(dim=1))
    m.copy_(m_new)


def _neg_scaled_softmax_(z: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """In place: z [n, V] scaled logits (whole rows) -> −gs·softmax(z), gs = g/T [n] (dz without onehot).

    torch's softmax normalises each row itself (max, sum-exp, divide, row by row while it sits in cache);
    writing into its own input is safe: the last pass is elementwise.
    """
    return torch.softmax(z, dim=1, out=z).mul_(-gs[:, None])


# --------------------------------------------------------------------------------------------------------
# linear_token_logprobs reference
# --------------------------------------------------------------------------------------------------------

def _linear_chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, inv_t: float,
                  out: torch.Tensor) -> torch.Tensor:
    """out[n, V] = (h·wᵀ + b) / T, written into the preallocated chunk buffer (no fresh allocation)."""
    if b is None:
        return torch.mm(h, w.t(), out=out).mul_(inv_t) if inv_t != 1.0 else torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), beta=inv_t, alpha=inv_t, out=out)


def _live_rows(h: torch.Tensor, valid: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """h [n, H] in the compute dtype with the rows of ignored tokens (valid [n] False) set to zero.

    A fresh tensor (never a view of the caller's hidden), [n, H]: small next to the [n, V] chunk math.
    """
    return torch.where(valid[:, None], h.to(cd), 0.0)


class LinearLogprobsTorch(torch.autograd.Function):
    """Chunked log softmax((h·Wᵀ + b)/T)[t] with a backward that recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, params: RefParams) -> torch.Tensor:
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64 -> [N] float32 (float64)
        cd = _compute_dtype(hidden.dtype)
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / params.temperature
        valid = targets != params.ignore_index
        tgt = torch.where(valid, targets, 0)
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        lse = torch.empty(n_tok, dtype=cd, device=hidden.device)
        out = torch.empty(n_tok, dtype=cd, device=hidden.device)
        tok_rows, cols = params.linear_tiles(n_tok, vocab, cd)
        buf = torch.empty(tok_rows * cols, dtype=cd, device=hidden.device)
        for s in range(0, n_tok, tok_rows):
            e = min(s + tok_rows, n_tok)
            n = e - s
            h = _live_rows(hidden[s:e], valid[s:e], cd)
            m = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
            acc = torch.zeros(n, dtype=cd, device=hidden.device)
            picked = torch.zeros(n, dtype=cd, device=hidden.device)
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                z = _linear_chunk(h, w[v0:v1], None if b is None else b[v0:v1], inv_t,
                                  buf[: n * (v1 - v0)].view(n, v1 - v0))
                _online_lse_step_(z, tgt[s:e] - v0, m, acc, picked)
            lse[s:e] = m + acc.log()
            out[s:e] = picked - lse[s:e]
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, tgt, valid, lse)
        ctx.params = params
        return out if cd == torch.float64 else out.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Loop order: token blocks of LINEAR_TOKENS rows outside, vocab chunks inside. d weight[v-chunk] is
        # then written (first token block) or accumulated once per token block, and the accumulator that is
        # revisited every vocab chunk is d hidden[block] (LINEAR_TOKENS·H, a few MB) instead of the whole
        # [V, H] d weight once per token chunk (GBs of memory traffic for a 50k vocabulary).
        # dz = gs·onehot(t) − gs·p with gs = g/T. The chunk only ever holds p = exp(z − lse); gs scales the
        # small operands instead of the [n, V] chunk:
        #   d hidden = −gs ⊙ (p·W) + gs ⊙ W[t]      (p·W accumulated over vocab chunks, scaled once)
        #   d weight = pᵀ·(−gs ⊙ h), then += gs ⊙ h at rows t   (index_add_)
        #   d bias   = pᵀ·(−gs), then += gs at t
        hidden, weight, bias, tgt, valid, lse = ctx.saved_tensors
        params: RefParams = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        cd = lse.dtype
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / params.temperature
        gs = torch.where(valid, grad_out.to(cd) * inv_t, 0.0)
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=cd, device=weight.device) if need_b else None
        tok_rows, cols = params.linear_tiles(n_tok, vocab, cd)
        # Also holds the [rows, H] gather W[t] after each token block's vocab loop (no extra allocation).
        buf = torch.empty(tok_rows * max(cols, hidden.shape[1]), dtype=cd, device=hidden.device)
        for s in range(0, n_tok, tok_rows):
            e = min(s + tok_rows, n_tok)
            n = e - s
            h = _live_rows(hidden[s:e], valid[s:e], cd)
            neg_gs = -gs[s:e]
            h_neg_gs = h * neg_gs[:, None] if (dw is not None) else None
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                # The forward's op on the forward's tile, so z here is bitwise the forward's z and
                # exp(z − lse) sums to 1 to fp32 precision even for extreme logits.
                p = _linear_chunk(h, w[v0:v1], None if b is None else b[v0:v1], inv_t,
                                  buf[: n * (v1 - v0)].view(n, v1 - v0))
                p.sub_(lse[s:e, None]).exp_()
                if dh is not None:
                    dh[s:e].addmm_(p, w[v0:v1])
                if dw is not None:
                    dw[v0:v1].addmm_(p.t(), h_neg_gs)
                if db is not None:
                    db[v0:v1].addmv_(p.t(), neg_gs)
            if dh is not None:
                w_t = torch.index_select(w, 0, tgt[s:e], out=buf[: n * w.shape[1]].view(n, w.shape[1]))
                dh[s:e].mul_(neg_gs[:, None]).addcmul_(gs[s:e, None], w_t)
            if dw is not None:
                dw.index_add_(0, tgt[s:e], h_neg_gs, alpha=-1)  # + gs ⊙ h at rows t
        if db is not None:
            db.index_add_(0, tgt, gs)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None)


def linear_token_logprobs_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                bias: torch.Tensor | None = None, temperature: float = 1.0,
                                ignore_index: int = IGNORE_INDEX, chunk_tokens: int = 0,
                                chunk_vocab: int = 0) -> torch.Tensor:
    """Per-token log-probs of a linear head, chunked over tokens (never the full [..., V] logits).

    hidden [..., H], weight [V, H], bias [V] | None, targets [...] int64 -> float32 [...]
    (float64 for float64 inputs). Naive equivalent (which materialises [..., V]):
        torch.log_softmax((hidden @ weight.T + bias) / T, -1).gather(-1, targets[..., None])[..., 0]
    with 0 where targets == ignore_index. Differentiable w.r.t. hidden, weight and bias.
    """
    targets, temperature = check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    lead = hidden.shape[:-1]
    params = RefParams(temperature=temperature, ignore_index=ignore_index, chunk_tokens=chunk_tokens,
                       chunk_vocab=chunk_vocab)
    out = LinearLogprobsTorch.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                    params)
    return out.reshape(lead)


# --------------------------------------------------------------------------------------------------------
# token_logprobs reference
# --------------------------------------------------------------------------------------------------------

def _scaled_copy(x: torch.Tensor, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """out = x / T in the compute dtype (a copy: the chunk math that follows is in place)."""
    out.copy_(x)  # upcast first, so bf16 logits are divided by T in fp32, not rounded to bf16
    return out.mul_(inv_t) if inv_t != 1.0 else out


class TokenLogprobsTorch(torch.autograd.Function):
    """Chunked log softmax(z/T)[t] from given logits; the backward recomputes softmax from the saved lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, params: RefParams) -> torch.Tensor:
        # logits [N, V], targets [N] int64 -> [N] float32 (float64)
        cd = _compute_dtype(logits.dtype)
        n_tok, vocab = logits.shape
        inv_t = 1.0 / params.temperature
        valid = targets != params.ignore_index
        tgt = torch.where(valid, targets, 0)
        lse = torch.empty(n_tok, dtype=cd, device=logits.device)
        out = torch.empty(n_tok, dtype=cd, device=logits.device)
        rows = min(params.rows(vocab, cd), max(n_tok, 1))
        buf = torch.empty(rows, vocab, dtype=cd, device=logits.device)
        for s in range(0, n_tok, rows):
            e = min(s + rows, n_tok)
            z = _scaled_copy(logits[s:e], inv_t, buf[: e - s])
            lse[s:e], out[s:e] = _lse_and_pick_(z, tgt[s:e])
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, tgt, valid, lse)
        ctx.params = params
        return out if cd == torch.float64 else out.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, tgt, valid, lse = ctx.saved_tensors
        params: RefParams = ctx.params
        cd = lse.dtype
        n_tok, vocab = logits.shape
        inv_t = 1.0 / params.temperature
        gs = torch.where(valid, grad_out.to(cd) * inv_t, 0.0)
        dlogits = torch.empty_like(logits)
        rows = min(params.rows(vocab, cd), max(n_tok, 1))
        buf = torch.empty(rows, vocab, dtype=cd, device=logits.device)
        for s in range(0, n_tok, rows):
            e = min(s + rows, n_tok)
            z = _scaled_copy(logits[s:e], inv_t, buf[: e - s])
            dz = _neg_scaled_softmax_(z, gs[s:e])
            dz.scatter_add_(1, tgt[s:e, None], gs[s:e, None])  # + gs·onehot(t)
            # Ignored rows: exact zeros, not 0·softmax(row), which is NaN when the row holds a NaN.
            dz[~valid[s:e]] = 0.0
            dlogits[s:e] = dz
        return dlogits, None, None


def token_logprobs_torch(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                         ignore_index: int = IGNORE_INDEX, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token log-probs from logits, chunked over tokens (at most one [chunk, V] fp32 block extra).

    logits [..., V] (any float dtype), targets [...] int64 -> float32 [...] (float64 for float64 logits).
    Naive equivalent: torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None])[..., 0],
    with 0 where targets == ignore_index. Differentiable w.r.t. logits (gradient in logits' dtype).
    """
    targets, temperature = check_token_inputs(logits, targets, temperature, ignore_index)
    lead = logits.shape[:-1]
    params = RefParams(temperature=temperature, ignore_index=ignore_index, chunk_tokens=chunk_tokens)
    out = TokenLogprobsTorch.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), params)
    return out.reshape(lead)
