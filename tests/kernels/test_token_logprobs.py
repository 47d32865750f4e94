"""Per-token log-prob Triton kernels from given logits (kernels/token_logprobs.py), via the interpreter.

Against the naive float64 formula and the torch reference: odd V (partial last block), V ≥ 131072,
leading shape [B, T], masked targets and fully masked rows, T ≠ 1, extreme logits, a random upstream
gradient, fp32/bf16/fp16, strided logits; every output written (NaN-filled buffers) and ≤ 0.
"""

from __future__ import annotations

import pytest
import torch

from fdpg_scale.kernels import token_logprobs
from fdpg_scale.kernels._triton_utils import is_interpreted
from fdpg_scale.kernels.token_logprobs import (TokenLogprobsParams, TokenLogprobsTriton, _token_fwd_kernel,
                                                token_logprobs_forward)
from tests.helpers import assert_close
from tests.kernels.helpers import IGNORE, make_token_case, naive_token_logprobs

pytestmark = pytest.mark.skipif(not is_interpreted(_token_fwd_kernel),
                                reason="needs TRITON_INTERPRET=1 at import (tests/conftest.py sets it)")


def check(out, ref, logits, grad, *, grad_dtype_tol=None, rtol=1e-5, atol=1e-5):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all() and (out <= 0).all()
    assert_close(out, ref, rtol=rtol, atol=atol, name="logprobs")
    (g,) = torch.autograd.grad(out, logits, grad)
    (r,) = torch.autograd.grad(ref, logits, grad.double())
    assert g.dtype == logits.dtype
    assert_close(g, r, dtype=grad_dtype_tol or torch.float32, name="dlogits")
    return g


def test_odd_vocab_leading_shape_mask_temperature():
    logits, targets, grad = make_token_case((3, 7), 1031)
    targets[1] = IGNORE
    out = token_logprobs(logits, targets, temperature=0.7, impl="triton")
    g = check(out, naive_token_logprobs(logits, targets, 0.7), logits, grad)
    assert (out[1] == 0).all() and (g[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    logits, targets, grad = make_token_case((2, 5), 1031, dtype=dtype)
    out = token_logprobs(logits, targets, temperature=1.3, impl="triton")
    check(out, naive_token_logprobs(logits, targets, 1.3), logits, grad, grad_dtype_tol=dtype)


def test_large_vocab():
    logits, targets, grad = make_token_case((2,), 131073, seed=1)
    out = token_logprobs(logits, targets, impl="triton")
    check(out, naive_token_logprobs(logits, targets), logits, grad)


def test_extreme_logits():
    logits, targets, grad = make_token_case((5,), 300, scale=1e4, seed=2)
    out = token_logprobs(logits, targets, impl="triton")
    check(out, naive_token_logprobs(logits, targets), logits, grad, rtol=1e-6, atol=1e-2)


def test_strided_logits_and_torch_impl_agree():
    gen = torch.Generator().manual_seed(3)
    leaf = torch.randn(2, 6, 1100, generator=gen).requires_grad_()
    logits = leaf[..., 5:1036]  # row stride 1100, offset 5
    targets = torch.randint(0, 1031, (2, 6), generator=gen)
    targets[0, 2] = IGNORE
    grad = torch.randn(2, 6, generator=gen)
    out_tr = token_logprobs(logits, targets, temperature=2.5, impl="triton")
    out_pt = token_logprobs(logits, targets, temperature=2.5, impl="torch")
    assert_close(out_tr, out_pt, name="triton vs torch")
    (g_tr,) = torch.autograd.grad(out_tr, leaf, grad)
    (g_pt,) = torch.autograd.grad(out_pt, leaf, grad)
    assert_close(g_tr, g_pt, name="dlogits triton vs torch")
    assert (g_tr[..., :5] == 0).all() and (g_tr[..., 1036:] == 0).all()


def test_every_output_written():
    logits, targets, _ = make_token_case((37,), 1031, seed=4)
    with torch.no_grad():
        out, lse = token_logprobs_forward(logits, targets, TokenLogprobsParams(block_v=128))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, naive_token_logprobs(logits, targets), name="logprobs")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_minus_inf_logits(impl):
    # Banned tokens carry −inf logits; a whole first block of them must not turn the online lse into NaN.
    logits, targets, grad = make_token_case((4,), 700, seed=5)
    with torch.no_grad():
        logits[0, :300] = float("-inf")
        logits[1, ::7] = float("-inf")
    targets[0] = 450
    targets[1] = 3
    out = token_logprobs(logits, targets, impl=impl) if impl == "torch" else \
        TokenLogprobsTriton.apply(logits, targets, TokenLogprobsParams(block_v=128))
    ref = naive_token_logprobs(logits, targets)
    assert torch.isfinite(out).all()
    check(out, ref, logits, grad)
