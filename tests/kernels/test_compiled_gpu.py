"""The Triton kernels compiled for a CUDA GPU, against the same float64 oracles (skipped without one).

The other tests in tests/kernels run these kernels in the Triton interpreter on CPU tensors. This module
is for a machine with a GPU, with the interpreter off:

    TRITON_INTERPRET=0 .venv/bin/python -m pytest tests/kernels/test_compiled_gpu.py -q

(tests/conftest.py sets TRITON_INTERPRET=1 only when the variable is unset; with it off, the interpreter
modules skip themselves.) Inputs come from the interpreter tests' own builders on the CPU and are copied
to the GPU; the oracles run in float64 on the CPU. What only a GPU exercises: autotuned block sizes (no
explicit blocks), bf16 tl.dot on tensor cores, fp32 dots with input_precision="ieee", atomics that race,
and the GPU's exp/log.
"""

from __future__ import annotations

import pytest
import torch

from fdpg_scale.core.divergences import DIVERGENCE_NAMES, get_divergence
from fdpg_scale.kernels import FDivWeights, fdiv_weights, linear_token_logprobs, token_logprobs
from fdpg_scale.kernels._triton_utils import is_interpreted
from fdpg_scale.kernels.linear_logprobs import _linear_fwd_kernel
from tests.helpers import TOLERANCES, assert_close
from tests.kernels.helpers import (DIVERGENCES as EXACT_DIVERGENCES, IGNORE, OUTSIDE_R, UNBOUNDED, assert_f32_result,
                                  assert_matches_naive, banned_token_case, layout, log_t_grid, make_batch,
                                  make_linear_case, make_token_case, naive64, naive_linear_logprobs,
                                  naive_token_logprobs, textbook_f_prime)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or is_interpreted(_linear_fwd_kernel),
                                reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0)")
DEVICE = torch.device("cuda")


def on_gpu(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DEVICE copy of a CPU test input: a fresh leaf (requires_grad kept) for floats, a plain copy else."""
    if x is None:
        return None
    y = x.detach().to(DEVICE)
    return y.requires_grad_(x.requires_grad) if x.is_floating_point() else y


def check_logprobs(out: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor, rtol: float, atol: float) -> None:
    assert out.device.type == DEVICE.type and out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all() and (out <= 0).all()
    assert (out.cpu()[targets == IGNORE] == 0).all()
    assert_close(out, ref, rtol=rtol, atol=atol, name="logprobs")


# (builder, temperature, forward (rtol, atol), gradient (rtol, atol) or None for the input dtype's)
LINEAR_CASES = {
    "odd-fp32-bias-masked-row": (lambda: make_linear_case(lead=(3, 13), hd=67, vocab=1031, masked_row=2),
                                 0.7, (1e-5, 1e-5), None),
    # bf16 products are exact in the fp32 accumulator: the forward stays at fp32 level; the backward's dot
    # operands (dz) are rounded to bf16, so the gradients are held to bf16's tolerance.
    "bf16": (lambda: make_linear_case(lead=(37,), dtype=torch.bfloat16), 1.5, (1e-4, 1e-4), None),
    "vocab-131101": (lambda: make_linear_case(lead=(3,), hd=16, vocab=131101, seed=4), 1.0, (1e-5, 1e-5), None),
    "extreme-logits": (lambda: make_linear_case(lead=(19,), hd=33, vocab=300, scale=3e3, bias=False),
                       1.0, (1e-5, 1e-2), (1e-4, 1e-2)),
    "minus-inf-bias": (banned_token_case, 1.0, (1e-5, 1e-5), None),
    "autotune-sized-bf16": (lambda: make_linear_case(lead=(4, 96), hd=256, vocab=50257, dtype=torch.bfloat16,
                                                     seed=9), 1.0, (1e-4, 1e-4), None),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_token_logprobs_compiled(case):
    build, temp, (f_rtol, f_atol), grad_tol = LINEAR_CASES[case]
    hidden, weight, bias, targets, grad = build()
    ref = naive_linear_logprobs(hidden, weight, targets, bias, temp)
    h, w, b, t = on_gpu(hidden), on_gpu(weight), on_gpu(bias), on_gpu(targets)
    out = linear_token_logprobs(h, w, t, bias=b, temperature=temp, impl="triton")
    check_logprobs(out, ref, targets, f_rtol, f_atol)
    live_gpu = [x for x in (h, w, b) if x is not None]
    live_cpu = [x for x in (hidden, weight, bias) if x is not None]
    got = torch.autograd.grad(out, live_gpu, grad.float().to(DEVICE))
    want = torch.autograd.grad(ref, live_cpu, grad.to(ref.dtype))
    for name, g, r in zip("hwb", got, want):
        assert g.dtype == hidden.dtype and torch.isfinite(g).all(), f"d{name}"
        rtol, atol = grad_tol or TOLERANCES[hidden.dtype]
        assert_close(g, r, rtol=rtol, atol=atol, name=f"d{name}")


TOKEN_CASES = {
    "odd-fp32": (lambda: make_token_case((37,), 1031), 0.8, None),
    "bf16": (lambda: make_token_case((5, 7), 1031, dtype=torch.bfloat16, seed=1), 1.0, None),
    "vocab-131073": (lambda: make_token_case((2,), 131073, seed=2), 1.0, None),
    "minus-inf": (lambda: make_token_case((4,), 700, seed=5), 1.0, "banned"),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_logprobs_compiled(case):
    build, temp, variant = TOKEN_CASES[case]
    logits, targets, grad = build()
    if variant == "banned":  # as in test_token_logprobs.test_minus_inf_logits
        with torch.no_grad():
            logits[0, :300] = float("-inf")
            logits[1, ::7] = float("-inf")
        targets[0], targets[1] = 450, 3
    ref = naive_token_logprobs(logits, targets, temp)
    z, t = on_gpu(logits), on_gpu(targets)
    out = token_logprobs(z, t, temperature=temp, impl="triton")
    check_logprobs(out, ref, targets, 1e-5, 1e-5)
    (g,) = torch.autograd.grad(out, z, grad.float().to(DEVICE))
    (r,) = torch.autograd.grad(ref, logits, grad.double())
    assert g.dtype == logits.dtype and torch.isfinite(g).all()
    assert_close(g, r, dtype=logits.dtype, name="dlogits")


DIVERGENCES = ([get_divergence(n) for n in DIVERGENCE_NAMES if n != "alpha"]
               + [get_divergence("alpha", alpha=a) for a in (-0.5, 0.5, 2.0)])


@pytest.mark.parametrize("d", DIVERGENCES, ids=str)
@pytest.mark.parametrize("lay", ["sequence", "token", "mixed"])
def test_fdiv_weights_compiled(d, lay):
    """Row 1 lies outside the support (exact limit, or the OUTSIDE_R penalty for rkl/rchi2/alpha(2))."""
    data = make_batch()
    args = {k: on_gpu(v) for k, v in layout(data, lay).items()}
    out = fdiv_weights(args["logp_pi"], args["logp_q"], args["log_target"], data["log_z"].to(DEVICE), d,
                       mask=args["mask"], log_scores=args["log_scores"], baseline=0.25,
                       outside_support_reward=OUTSIDE_R, impl="triton")
    assert out.weight.device.type == DEVICE.type
    on_cpu = FDivWeights(**{f: getattr(out, f).cpu() for f in FDivWeights.__dataclass_fields__})
    assert_matches_naive(on_cpu, naive64(data, d, baseline=0.25), f"{d}/{lay}/cuda")


@pytest.mark.parametrize("d", EXACT_DIVERGENCES, ids=str)
def test_fdiv_exact_f_prime_compiled(d):
    """No clamp on the GPU either: r = −f′(log t) for |log t| ≤ 1e4 against 60-digit arithmetic, the GPU's
    exp/log included (fp32 tl.exp lowers to ex2.approx: a relative error ≈ |x|·2^-24 more than the
    interpreter's, inside the same 1e-5 for |x| ≤ 89)."""
    lt = log_t_grid()
    out = fdiv_weights(lt.to(DEVICE), lt.to(DEVICE), torch.zeros_like(lt, device=DEVICE), 0.0, d, impl="triton")
    assert torch.equal(out.log_t.cpu(), lt)
    exact = [-textbook_f_prime(d, v) for v in lt.tolist()]
    assert_f32_result(out.pseudo_reward.cpu(), exact, rtol=1e-5, atol=1e-6, name=f"{d}/cuda r")
    # Outside the support: the exact limit, or the chosen penalty.
    x = torch.tensor([-3.0, -3.0], device=DEVICE)
    target = torch.tensor([float("-inf"), -3.0], device=DEVICE)
    out = fdiv_weights(x, x, target, 0.0, d, outside_support_reward=-20.0, impl="triton")
    limit = d.fprime_spec.limit_at_infinity
    want = -20.0 if str(d) in UNBOUNDED else torch.tensor(-limit, dtype=torch.float32).item()
    assert out.pseudo_reward[0].item() == want and out.log_t[0].item() == float("inf")
