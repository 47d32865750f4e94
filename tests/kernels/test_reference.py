"""The torch references (kernels/reference.py): the CPU path and the oracle for the Triton kernels.

Checked against the naive float64 formula written out here (materialising the logits is fine at test
sizes), with odd sizes, several chunks in every dimension, masked targets, T ≠ 1, a bias, leading shapes,
a random upstream gradient; plus gradcheck in float64 and the bad-input errors of the public API.
"""

from __future__ import annotations

import pytest
import torch

from fdpg_scale.kernels import linear_token_logprobs, token_logprobs
from fdpg_scale.kernels.reference import linear_token_logprobs_torch, token_logprobs_torch
from tests.helpers import assert_close
from tests.kernels.helpers import (IGNORE, banned_token_case, grads, make_linear_case, naive_linear_logprobs,
                                  naive_token_logprobs)


@pytest.mark.parametrize("chunks", [dict(), dict(chunk_tokens=8, chunk_vocab=100)], ids=["default", "small"])
def test_linear_matches_naive_float64(chunks):
    hidden, weight, bias, targets, grad = make_linear_case(lead=(3, 13), dtype=torch.float64, masked_row=1)
    out = linear_token_logprobs_torch(hidden, weight, targets, bias=bias, temperature=0.7, **chunks)
    ref = naive_linear_logprobs(hidden, weight, targets, bias, 0.7)
    assert out.dtype == torch.float64 and out.shape == (3, 13)
    assert_close(out, ref, name="logprobs")
    assert (out[1] == 0).all()
    for name, g, r in zip("hwb", grads(out, (hidden, weight, bias), grad), grads(ref, (hidden, weight, bias), grad)):
        assert_close(g, r, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_low_precision_inputs(dtype):
    hidden, weight, bias, targets, grad = make_linear_case(dtype=dtype)
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=1.3, impl="torch")
    # The oracle sees exactly the same (rounded) inputs, so the forward error is fp32 accumulation only.
    ref = naive_linear_logprobs(hidden, weight, targets, bias, 1.3)
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=1e-5, atol=2e-5, name="logprobs")
    got = grads(out, (hidden, weight, bias), grad)
    want = grads(ref, (hidden, weight, bias), grad)
    for name, g, r in zip("hwb", got, want):
        assert g.dtype == dtype
        assert_close(g, r, dtype=dtype, name=f"d{name}")  # bf16: the gradient is rounded to bf16


@pytest.mark.parametrize("chunks", [dict(), dict(chunk_tokens=8, chunk_vocab=100)], ids=["default", "small"])
def test_linear_extreme_logits_finite(chunks):
    # |logits| up to ~1e4: the backward's recomputed exp(z − lse) must agree with the forward's lse to
    # fp32 precision, also when its chunks have other shapes than the forward's (small).
    hidden, weight, bias, targets, grad = make_linear_case(scale=3e3, bias=False)
    out = linear_token_logprobs_torch(hidden, weight, targets, **chunks)
    ref = naive_linear_logprobs(hidden, weight, targets)
    assert ref.abs().max() > 1e3
    assert torch.isfinite(out).all() and (out <= 0).all()
    assert_close(out, ref, rtol=1e-5, atol=1e-2, name="logprobs")
    for name, g, r in zip("hw", grads(out, (hidden, weight), grad), grads(ref, (hidden, weight), grad)):
        assert torch.isfinite(g).all()
        assert_close(g, r, rtol=1e-4, atol=1e-2, name=f"d{name}")


@pytest.mark.parametrize("chunks", [dict(), dict(chunk_tokens=4)], ids=["default", "small"])
def test_token_matches_naive(chunks):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 1031, generator=gen) * 4).requires_grad_()
    targets = torch.randint(0, 1031, (4, 9), generator=gen)
    targets[0] = IGNORE
    targets[2, ::3] = IGNORE
    grad = torch.randn(4, 9, generator=gen)
    out = token_logprobs_torch(logits, targets, temperature=0.6, **chunks)
    ref = naive_token_logprobs(logits, targets, 0.6)
    assert out.dtype == torch.float32
    assert_close(out, ref, name="logprobs")
    assert (out[0] == 0).all() and (out <= 0).all()
    (g,) = torch.autograd.grad(out, logits, grad)
    (r,) = torch.autograd.grad(ref, logits, grad.double())
    assert_close(g, r, name="dlogits")
    assert (g[0] == 0).all()


def test_token_bf16_and_strided_logits():
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(6, 1100, generator=gen).mul(5).to(torch.bfloat16)
    leaf = big.clone().requires_grad_()
    logits = leaf[:, :1031]  # row stride 1100: a strided view
    assert not logits.is_contiguous()
    targets = torch.randint(0, 1031, (6,), generator=gen)
    out = token_logprobs(logits, targets, temperature=2.0, impl="torch")
    ref = naive_token_logprobs(logits, targets, 2.0)
    assert_close(out, ref, rtol=1e-5, atol=1e-5, name="logprobs")
    grad = torch.randn(6, generator=gen)
    (g,) = torch.autograd.grad(out, leaf, grad)
    (r,) = torch.autograd.grad(ref, leaf, grad.double())
    assert g.dtype == torch.bfloat16
    assert_close(g, r, dtype=torch.bfloat16, name="dlogits")


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, IGNORE, 12], [0, 5, 7]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_token_logprobs_torch(h, w, targets, bias=b, temperature=0.8, chunk_tokens=4,
                                                    chunk_vocab=5), (hidden, weight, bias))
    logits = torch.randn(2, 3, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_torch(z, targets, temperature=1.7, chunk_tokens=4), (logits,))


def test_weight_frozen_only_hidden_grad():
    hidden, weight, bias, targets, grad = make_linear_case(lead=(11,), hd=8, vocab=50, dtype=torch.float64)
    weight.requires_grad_(False)
    out = linear_token_logprobs(hidden, weight, targets, impl="torch")
    (g,) = torch.autograd.grad(out, hidden, grad)
    (r,) = torch.autograd.grad(naive_linear_logprobs(hidden, weight, targets), hidden, grad)
    assert_close(g, r, name="dh")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_inputs(impl):
    h = torch.randn(2, 5, 8)
    w = torch.randn(20, 8)
    t = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match="hidden's last dim H=8.*weight's H=7"):
        linear_token_logprobs(h, torch.randn(20, 7), t, impl=impl)
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\)"):
        linear_token_logprobs(h, w, t[:, :4], impl=impl)
    for bad in (20, -1, -101):
        t_bad = t.clone()
        t_bad[1, 3] = bad
        with pytest.raises(ValueError, match=f"targets must lie in \\[0, 20\\).*found {bad}"):
            linear_token_logprobs(h, w, t_bad, impl=impl)
        with pytest.raises(ValueError, match=f"found {bad}"):
            token_logprobs(torch.randn(2, 5, 20), t_bad, impl=impl)
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        linear_token_logprobs(h.to(torch.int32), w, t, impl=impl)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        linear_token_logprobs(h, w.long(), t, impl=impl)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        token_logprobs(torch.randint(0, 3, (2, 5, 20)), t, impl=impl)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        token_logprobs(torch.randn(2, 5, 20), t.float(), impl=impl)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_token_logprobs(h, w, t, bias=torch.randn(19), impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 5, 20), t, temperature=0.0, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(torch.randn(2, 5, 20), t, impl="cuda")


def test_target_values_are_read_on_cpu_only_unless_asked():
    """The range check reads the targets' values: free on CPU, a host sync per call on a GPU, so on other
    devices it runs only with check_targets=True. "meta" tensors stand in for a device (they have no values:
    reading one raises)."""
    from fdpg_scale.kernels.reference import check_linear_inputs, check_token_inputs

    h, w = torch.empty(2, 5, 8, device="meta"), torch.empty(20, 8, device="meta")
    t = torch.empty(2, 5, dtype=torch.long, device="meta")
    check_linear_inputs(h, w, t, None, 1.0)  # no value read: no error
    check_token_inputs(torch.empty(2, 5, 20, device="meta"), t, 1.0)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_linear_inputs(h, w, t, None, 1.0, check_targets=True)
    t_bad = torch.randint(0, 20, (2, 5))
    t_bad[0, 0] = 20
    h_cpu, w_cpu = torch.randn(2, 5, 8), torch.randn(20, 8)
    check_linear_inputs(h_cpu, w_cpu, t_bad, None, 1.0, check_targets=False)  # explicitly off
    with pytest.raises(ValueError, match="found 20"):
        linear_token_logprobs(h_cpu, w_cpu, t_bad, impl="torch", check_targets=True)


@pytest.mark.parametrize("chunks", [dict(), dict(chunk_tokens=8, chunk_vocab=100)], ids=["default", "small"])
def test_linear_minus_inf_bias(chunks):
    hidden, weight, bias, targets, grad = banned_token_case()
    out = linear_token_logprobs_torch(hidden, weight, targets, bias=bias, **chunks)
    ref = naive_linear_logprobs(hidden, weight, targets, bias)
    assert torch.isfinite(out).all()
    assert_close(out, ref, name="logprobs")
    for name, g, r in zip("hwb", grads(out, (hidden, weight, bias), grad), grads(ref, (hidden, weight, bias), grad)):
        assert torch.isfinite(g).all(), f"d{name}"
        assert_close(g, r, name=f"d{name}")


def _allocations(fn) -> list[int]:
    """Bytes of every CPU allocation made by an op while fn runs (torch profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)


def test_never_materialises_full_logits():
    n, hd, vocab = 256, 8, 4096
    hidden = torch.randn(n, hd, requires_grad=True)
    weight = torch.randn(vocab, hd, requires_grad=True)
    logits = torch.randn(n, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    full = n * vocab * 4

    def naive():
        torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).sum().backward()

    def chunked():
        linear_token_logprobs_torch(hidden, weight, targets, chunk_tokens=32, chunk_vocab=512).sum().backward()

    def chunked_token():
        token_logprobs_torch(logits, targets, chunk_tokens=32).sum().backward()

    assert _allocations(naive)[0] >= full  # the probe does see a full [N, V] block when there is one
    assert _allocations(chunked)[0] <= 32 * vocab * 4  # one [32, V] forward / [32, 512] backward chunk
    # token_logprobs: the gradient d logits is [N, V] by definition; nothing else may be that large.
    sizes = _allocations(chunked_token)
    assert sizes[0] == full and sizes[1] <= 32 * vocab * 4, sizes[:3]


def test_auto_on_cpu_is_the_torch_path():
    hidden, weight, bias, targets, _ = make_linear_case(lead=(5,), hd=12, vocab=90)
    assert torch.equal(linear_token_logprobs(hidden, weight, targets, bias=bias),
                       linear_token_logprobs(hidden, weight, targets, bias=bias, impl="torch"))
    logits = torch.randn(5, 90)
    assert torch.equal(token_logprobs(logits, targets), token_logprobs(logits, targets, impl="torch"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_scalar_and_empty_leading_shapes(impl):
    weight = torch.randn(30, 6, requires_grad=True)
    h1 = torch.randn(6, requires_grad=True)
    out = linear_token_logprobs(h1, weight, torch.tensor(4), impl=impl)
    assert out.shape == () and out.dtype == torch.float32
    assert_close(out, naive_linear_logprobs(h1, weight, torch.tensor(4)), name="scalar")
    out.backward()
    assert h1.grad.shape == (6,) and torch.isfinite(weight.grad).all()
    empty = linear_token_logprobs(torch.randn(0, 3, 6), weight, torch.zeros(0, 3, dtype=torch.long), impl=impl)
    assert empty.shape == (0, 3)
    assert token_logprobs(torch.randn(2, 0, 30), torch.zeros(2, 0, dtype=torch.long), impl=impl).shape == (2, 0)
