"""A NaN or inf in a token that is ignored (target −100, e.g. padding) reaches no output and no gradient.

Left-padded prompts can leave NaN hidden states in fully masked rows. Zeroing the upstream gradient of an
ignored token is not enough (0·NaN = NaN in dzᵀ·h), so every path (the Triton kernels through the
interpreter and the torch references) is run on inputs poisoned in their ignored rows and compared with
the same inputs unpoisoned.
"""

from __future__ import annotations

import pytest
import torch

from fdpg_scale.kernels import linear_token_logprobs, token_logprobs
from fdpg_scale.kernels.linear_logprobs import _linear_fwd_kernel
from fdpg_scale.kernels._triton_utils import is_interpreted
from tests.helpers import assert_close
from tests.kernels.helpers import IGNORE, grads, make_linear_case

IMPLS = [
    pytest.param("triton", marks=pytest.mark.skipif(not is_interpreted(_linear_fwd_kernel),
                                                    reason="needs TRITON_INTERPRET=1 at import")),
    "torch",
]


def poison(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A leaf copy of x [..., K] with NaN in every ignored token's row and +inf in one of them."""
    bad = x.detach().clone()
    ignored = targets == IGNORE
    bad[ignored] = float("nan")
    first = ignored.nonzero()[0]
    bad[tuple(first)] = float("inf")
    return bad.requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nan_in_ignored_hidden_rows(impl, dtype):
    hidden, weight, bias, targets, grad = make_linear_case(lead=(3, 13), hd=67, vocab=1031, dtype=dtype,
                                                           masked_row=2)
    ignored = targets == IGNORE
    assert ignored[2].all() and ignored[0].any() and not ignored.all()
    bad = poison(hidden, targets)
    assert bad.isnan().any() and bad.isinf().any()

    clean_out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, impl=impl)
    out = linear_token_logprobs(bad, weight, targets, bias=bias, temperature=0.7, impl=impl)
    assert torch.isfinite(out).all()
    assert (out[ignored] == 0).all()
    assert_close(out, clean_out, name="logprobs")

    clean = grads(clean_out, (hidden, weight, bias), grad)
    got = grads(out, (bad, weight, bias), grad)
    for name, g, c in zip(("d hidden", "d weight", "d bias"), got, clean):
        assert torch.isfinite(g).all(), f"{name} holds {int((~torch.isfinite(g)).sum())} non-finite values"
        assert_close(g, c, name=name)
    assert (got[0][ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_token_nan_in_ignored_logit_rows(impl):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, 1031, generator=gen)
    targets = torch.randint(0, 1031, (4, 9), generator=gen)
    targets[1] = IGNORE
    targets[0, :3] = IGNORE
    grad = torch.randn(4, 9, generator=gen)
    clean = logits.clone().requires_grad_()
    bad = poison(logits, targets)

    clean_out = token_logprobs(clean, targets, temperature=1.3, impl=impl)
    out = token_logprobs(bad, targets, temperature=1.3, impl=impl)
    assert torch.isfinite(out).all()
    assert_close(out, clean_out, name="logprobs")
    (d_clean,) = torch.autograd.grad(clean_out, clean, grad)
    (d_bad,) = torch.autograd.grad(out, bad, grad)
    assert torch.isfinite(d_bad).all()
    assert (d_bad[targets == IGNORE] == 0).all()
    assert_close(d_bad, d_clean, name="d logits")
