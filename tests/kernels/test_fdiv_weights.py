"""fdiv_weights: Triton kernel (interpreter) vs torch reference vs a float64 naive computation.

Inputs are dyadic (multiples of 1/64, or 1/8 for bf16/fp16) so that every masked sum, in any order and in
float32, is *exact*: log t then agrees bit for bit between the kernel, the reference and float64, and the
remaining tolerances measure only the f′/exp evaluation (a summation-order difference cannot hide in them).
Batches have an odd B = 37 and T = 53 with blocks of 16, so the kernel runs partial programs and a partial
last T block; row 0 is fully masked, row 1 is outside the target's support (log P = −inf), rows 2/3 have
log-ratios log π − log q ≈ ±64 and rows 4/5 have log t ≈ ±60 (where chi2's f′ = 1 − e^{−2 log t} is beyond
float32: r = −inf honestly, while the weight stays finite through log space). Nothing is clamped; the exact
f′ over |log t| ≤ 1e4 and the outside-support rules are tested against 60-digit arithmetic in
test_fdiv_exact.py.

Measured precision of the kernel's own helpers (test_expm1_softplus_precision, fp32 x ∈ [−88, 88], the
interpreter): expm1 relative error ≤ 2.6e-7 (2.2 ulp; torch.expm1 in fp32: 8.9e-8), softplus absolute
error ≤ 5.4e-7 (≈ 2 ulp of the result).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.kernels import FDivWeights, fdiv_weights
from fdpg_scale.kernels.fdiv_reference import check_fdiv_inputs, fdiv_weights_torch
from fdpg_scale.kernels.fdiv_weights import _expm1, _softplus, fdiv_weights_triton
from tests.helpers import assert_close
from tests.kernels.helpers import (B, DIVERGENCES, F64, FIELDS, IDS, OUTSIDE_R, T, assert_matches_naive, layout,
                                  make_batch, naive64)

# The interpreter runs the kernel in numpy, which warns on the IEEE overflows, infs and NaNs that these
# tests create on purpose (and then check value by value).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

BLOCK = 16


# ------------------------------------------------------------------------------------------------------
# Data and the float64 oracle
# ------------------------------------------------------------------------------------------------------


def run(impl, args, d, block=BLOCK, **kw) -> FDivWeights:
    """impl 'torch' / 'triton' (small blocks: loops over T and partial programs) / 'api' (public defaults)."""
    kw.setdefault("outside_support_reward", OUTSIDE_R)
    if impl == "api":
        return fdiv_weights(args["logp_pi"], args["logp_q"], args["log_target"], kw.pop("log_z"), d,
                            mask=args["mask"], log_scores=args["log_scores"], impl="triton", **kw)
    inputs = check_fdiv_inputs(args["logp_pi"], args["logp_q"], args["log_target"], kw.pop("log_z"), d,
                               mask=args["mask"], log_scores=args["log_scores"], **kw)
    return fdiv_weights_torch(inputs) if impl == "torch" else fdiv_weights_triton(inputs, block_b=block,
                                                                                  block_t=block)


# ------------------------------------------------------------------------------------------------------
# Agreement: triton vs reference vs float64
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("lay", ["sequence", "token", "mixed"])
def test_matches_reference_and_float64(d, lay):
    data = make_batch()
    args = layout(data, lay)
    ref = naive64(data, d, baseline=0.25)
    outs = {impl: run(impl, args, d, log_z=data["log_z"], baseline=0.25) for impl in ("torch", "triton", "api")}
    for impl, out in outs.items():
        assert_matches_naive(out, ref, f"{d}/{lay}/{impl}")     # incl. ±inf exactly where float64 is beyond float32
    assert torch.equal(outs["triton"].log_t, outs["torch"].log_t)
    # Unclamped: row 1 (log P = −inf) reports log t = +inf, rows 4/5 their exact ±60-odd.
    assert outs["triton"].log_t[1].item() == float("inf")
    assert outs["triton"].log_t[4].item() > 55 and outs["triton"].log_t[5].item() < -55


@pytest.mark.parametrize("d", [get_divergence(n) for n in ("kl", "tv", "js", "hellinger")]
                         + [get_divergence("alpha", alpha=-0.5)], ids=str)
def test_baseline_clip_and_log_z_forms(d):
    data = make_batch(seed=1)
    args = layout(data, "token")
    clip = 0.25 if d.name == "tv" else 3.0
    baselines = [0.5, torch.tensor(0.5), torch.tensor([0.5]),
                 torch.linspace(-1, 1, B)]            # per-context baseline [B]
    for baseline in baselines:
        ref = naive64(data, d, baseline=baseline, clip=clip)
        unclipped = naive64(data, d, baseline=baseline)["pseudo_reward"]
        assert (unclipped.abs() > clip).any(), "clip must bite on some rows"
        assert (unclipped.abs() < clip).any() or d.name == "tv", "and leave others (tv's |r| is always ½)"
        for impl in ("torch", "triton"):
            out = run(impl, args, d, log_z=data["log_z"], baseline=baseline, clip=clip)
            assert_matches_naive(out, ref, f"{d}/{impl}/baseline={baseline}")
            assert out.pseudo_reward.abs().max().item() == pytest.approx(clip)
    # One log Z for the whole batch: as a python float, 0-d and [1] tensors, and broadcast to [B].
    scalar = dict(data, log_z=torch.full((B,), 1.5))
    ref = naive64(scalar, d)
    for log_z in (1.5, torch.tensor(1.5), torch.tensor([1.5]), torch.full((B,), 1.5),
                  torch.tensor(1.5, dtype=F64)):
        for impl in ("torch", "triton"):
            assert_matches_naive(run(impl, args, d, log_z=log_z), ref, f"{d}/{impl}/log_z={log_z!r}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F64])
def test_low_and_high_precision_token_inputs(dtype):
    """bf16/fp16 per-token log-probs are upcast on load and summed in fp32 (exact for these dyadic values)."""
    data = make_batch(dtype=dtype, seed=2)
    args = layout(data, "token")
    for d in (get_divergence("rkl"), get_divergence("chi2"), get_divergence("alpha", alpha=0.5)):
        ref = naive64(data, d, baseline=-0.5)
        for impl in ("torch", "triton"):
            out = run(impl, args, d, log_z=data["log_z"], baseline=-0.5)
            assert_matches_naive(out, ref, f"{dtype}/{d}/{impl}")


def test_mask_forms_agree():
    """bool, float 0/1 and int 0/1 masks give identical results; mask=None counts every token."""
    data = make_batch(seed=3)
    data["pi"] = torch.nan_to_num(data["pi"], nan=-1.0)
    data["a"] = torch.nan_to_num(data["a"], neginf=-2.0)
    args = layout(data, "token")
    d = get_divergence("js")
    for impl in ("torch", "triton"):
        base = run(impl, args, d, log_z=data["log_z"])
        for mask in (args["mask"].float(), args["mask"].long()):
            other = run(impl, dict(args, mask=mask), d, log_z=data["log_z"])
            for f in FIELDS:
                assert torch.equal(getattr(base, f), getattr(other, f)), (impl, mask.dtype, f)
        everything = run(impl, dict(args, mask=None), d, log_z=data["log_z"])
        ones = run(impl, dict(args, mask=torch.ones(B, T, dtype=torch.bool)), d, log_z=data["log_z"])
        for f in FIELDS:
            assert torch.equal(getattr(everything, f), getattr(ones, f)), (impl, f)


@pytest.mark.parametrize("batch", [1, 15, 16, 17, 37])
@pytest.mark.parametrize("tokens", [1, 16, 53])
def test_every_output_written(batch, tokens):
    """Outputs start as NaN (the launcher poisons them): all finite here means every row was written."""
    data = make_batch(seed=4, batch=batch, tokens=tokens)
    args = layout(data, "token")
    ref = torch.stack([getattr(run("torch", args, "rkl", log_z=data["log_z"]), f) for f in FIELDS])
    got = torch.stack([getattr(run("triton", args, "rkl", log_z=data["log_z"]), f) for f in FIELDS])
    assert not torch.isnan(got).any() and not torch.isnan(ref).any()     # +inf: log t of the P = 0 row
    assert_close(got, ref, rtol=1e-6, atol=1e-6, name=f"B={batch} T={tokens}")


# ------------------------------------------------------------------------------------------------------
# Edge values: zero-probability samples, overflowing ratios, NaN, empty batches
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_zero_policy_probability_gives_zero_or_exact_weight(d):
    """log π = −inf (a sample π cannot produce, ρ = 0): log t = −inf and r may be ±inf, yet the weight is the
    limit of ρ·(B + f′) as π → 0: 0, except kl's −p/q (ρ·f′ = −π/q · p/π) and the divergences whose
    ρ·f′ ∝ π^(1+κ) with 1 + κ < 0 (chi2, alpha(−0.5)): −inf. Rows 1-2: P = 0 as well, or ordinary."""
    logp_pi = torch.tensor([float("-inf"), float("-inf"), -3.0])
    logp_q = torch.tensor([-3.0, -3.0, -3.0])
    log_target = torch.tensor([-4.0, float("-inf"), -4.0])
    want0 = {"kl": -math.exp(-4.0 + 3.0), "chi2": float("-inf"), "alpha(-0.5)": float("-inf")}.get(str(d), 0.0)
    for impl in ("torch", "triton"):
        out = fdiv_weights(logp_pi, logp_q, log_target, 0.0, d, baseline=0.1, outside_support_reward=OUTSIDE_R,
                           impl=impl)
        assert out.log_t[0].item() == float("-inf") and out.importance_ratio[0].item() == 0.0
        assert out.weight[0].item() == pytest.approx(want0, rel=1e-6), (impl, out.weight)
        assert out.weight[1].item() == 0.0 and out.log_t[1].item() == float("inf"), (impl, out)
        assert not torch.isnan(out.weight).any() and not torch.isnan(out.pseudo_reward).any(), (impl, out)


def test_overflowing_ratio_uses_log_space():
    """ρ = e^100 overflows float32 but ρ·(B − r) may not: tv at log t = 0 has r = 0, so w = e^100·B."""
    logp_pi, logp_q = torch.zeros(3), torch.full((3,), -100.0)
    for impl in ("torch", "triton"):
        out = fdiv_weights(logp_pi, logp_q, torch.zeros(3), 0.0, "tv", impl=impl,
                           baseline=torch.tensor([1e-6, 0.0, 1.0]))
        assert torch.isinf(out.importance_ratio).all()
        w = out.weight.tolist()
        assert w[0] == pytest.approx(torch.exp(torch.tensor(100.0, dtype=F64)).item() * 1e-6, rel=1e-5), impl
        assert w[1] == 0.0, f"{impl}: inf·0 must give 0, got {w[1]}"       # a zero coefficient, never NaN
        assert w[2] == float("inf"), impl                                # true 2.7e43: beyond float32


@pytest.mark.parametrize("impl,d", [("torch", "kl"), ("torch", "js"), ("torch", "tv"),
                                    ("triton", "kl"), ("triton", "js"), ("triton", "tv")])
def test_nan_inputs_stay_nan_and_padding_is_ignored(impl, d):
    logp_pi = torch.tensor([[-1.0, float("nan")], [-1.0, float("nan")], [-1.0, -1.0]])
    logp_q = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    out = fdiv_weights(logp_pi, logp_q, torch.full((3, 2), -1.0), 0.0, d, mask=mask, impl=impl)
    assert torch.isnan(out.log_t[0]) and torch.isnan(out.weight[0]) and torch.isnan(out.importance_ratio[0])
    assert torch.isfinite(torch.stack([getattr(out, f)[1] for f in FIELDS])).all(), out   # NaN in padding
    # A NaN proposal log-prob: the ratio and the weight are NaN even where B − r = 0 (tv at log t = 0).
    assert torch.isnan(out.importance_ratio[2]) and torch.isnan(out.weight[2]), out
    assert torch.isnan(out.pseudo_reward[0]), out


def test_empty_batch_and_zero_tokens():
    for impl in ("torch", "triton"):
        out = fdiv_weights(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.0, "kl", impl=impl)
        assert all(getattr(out, f).shape == (0,) and getattr(out, f).dtype == torch.float32 for f in FIELDS)
        out = fdiv_weights(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), 0.5, "rkl",
                           mask=torch.zeros(3, 0, dtype=torch.bool), impl=impl)
        assert out.log_t.tolist() == [0.5] * 3 and out.importance_ratio.tolist() == [1.0] * 3


def test_strided_inputs_and_detached_outputs():
    data = make_batch(seed=5)
    args = layout(data, "token")
    strided = {k: (v.t().contiguous().t() if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
               for k, v in args.items()}
    assert strided["logp_pi"].stride(1) != 1
    strided["logp_pi"] = strided["logp_pi"].clone().requires_grad_(True)
    scores = torch.stack([data["log_scores"], data["log_scores"]], 1)[:, 0]    # stride 2
    strided["log_scores"] = scores
    d = get_divergence("hellinger")
    baseline = torch.linspace(-1, 1, B)
    want = run("triton", args, d, log_z=data["log_z"], baseline=baseline)
    every_other = lambda x: torch.stack([x, x], 1)[:, 0]      # noqa: E731  a [B] view with stride 2
    for impl in ("torch", "triton"):
        got = run(impl, strided, d, log_z=every_other(data["log_z"]), baseline=every_other(baseline))
        for f in FIELDS:
            assert not getattr(got, f).requires_grad
            assert_close(getattr(got, f), getattr(want, f), rtol=1e-6, atol=1e-6, name=f"{impl} {f}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        want.weight = want.log_t


def test_auto_is_torch_on_cpu_and_names_equal_objects():
    data = make_batch(seed=6)
    args = layout(data, "token")
    kw = dict(mask=args["mask"], log_scores=args["log_scores"])
    auto = fdiv_weights(args["logp_pi"], args["logp_q"], args["log_target"], data["log_z"], "js", **kw)
    torch_ = fdiv_weights(args["logp_pi"], args["logp_q"], args["log_target"], data["log_z"],
                          get_divergence("js"), impl="torch", **kw)
    for f in FIELDS:
        assert torch.equal(getattr(auto, f), getattr(torch_, f)), f


# ------------------------------------------------------------------------------------------------------
# The kernel's expm1 / softplus helpers
# ------------------------------------------------------------------------------------------------------

@triton.jit
def _helpers_kernel(X_ptr, E_ptr, S_ptr, N, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(X_ptr + offs, mask=offs < N)
    tl.store(E_ptr + offs, _expm1(x), mask=offs < N)
    tl.store(S_ptr + offs, _softplus(x), mask=offs < N)


def test_expm1_softplus_precision():
    x = torch.cat([torch.zeros(1), torch.linspace(-3, 3, 60001), torch.logspace(-30, 0, 3001),
                   -torch.logspace(-30, 0, 3001), torch.linspace(-88, 88, 30001)]).float()
    e, s = torch.empty_like(x), torch.empty_like(x)
    _helpers_kernel[(triton.cdiv(x.numel(), 8192),)](x, e, s, x.numel(), BLOCK_N=8192)
    x64 = x.to(F64)
    exact = torch.expm1(x64)
    rel = ((e.to(F64) - exact).abs() / exact.abs()).nan_to_num(0.0)   # x = 0 gives 0/0; e is 0 there
    assert e[x == 0].abs().max().item() == 0.0
    assert rel.max().item() < 4e-7, f"expm1 rel err {rel.max().item():.3e} at x = {x[rel.argmax()].item()}"
    soft = torch.nn.functional.softplus(x64, threshold=1000.0)
    err = (s.to(F64) - soft).abs()
    assert err.max().item() < 8e-7, f"softplus abs err {err.max().item():.3e} at x = {x[err.argmax()].item()}"
    assert torch.isfinite(s).all() and torch.isfinite(e[x < 88]).all()


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------

def _good():
    return dict(logp_pi=torch.zeros(B, T), logp_q=torch.zeros(B, T), log_target=torch.zeros(B, T), log_z=0.0,
                divergence="kl", mask=torch.ones(B, T, dtype=torch.bool), log_scores=torch.zeros(B))


BAD = [
    (dict(logp_q=torch.zeros(B - 1)), ValueError, r"logp_q has shape \[36\] but logp_pi has B = 37"),
    (dict(log_target=torch.zeros(B, T + 1)), ValueError, r"disagree on T: logp_pi has shape \[37, 53\], "
                                                         r"log_target has shape \[37, 54\]"),
    (dict(mask=torch.ones(B, T - 1)), ValueError, r"mask must be \[B, T\] = \[37, 53\] .*got shape \[37, 52\]"),
    (dict(logp_pi=torch.zeros(B), logp_q=torch.zeros(B), log_target=torch.zeros(B)), ValueError,
     r"mask \(shape \[37, 53\]\) given but .* all per sequence"),
    (dict(log_z=torch.zeros(B + 1)), ValueError, r"log_z must be a scalar, a 0-d tensor or \[B\] = \[37\], "
                                                 r"got shape \[38\]"),
    (dict(baseline=torch.zeros(2, 2)), ValueError, r"baseline must be .* got shape \[2, 2\]"),
    (dict(log_scores=torch.zeros(B, 1)), ValueError, r"log_scores must be \[B\] = \[37\], got shape \[37, 1\]"),
    (dict(logp_pi=torch.zeros(B, T, 2)), ValueError, r"logp_pi must be \[B\] .* or \[B, T\] .*\[37, 53, 2\]"),
    (dict(logp_pi=torch.zeros(B, T, dtype=torch.long)), TypeError, "logp_pi must be a floating-point tensor"),
    (dict(log_z="0"), TypeError, "log_z must be a float or a tensor"),
    (dict(divergence="kl2"), ValueError, "unknown divergence 'kl2'; valid names: kl, rkl, tv, js"),
    (dict(divergence="alpha"), ValueError, "needs alpha="),
    (dict(clip=0.0), ValueError, "clip must be None or a finite float > 0"),
    (dict(clip=float("nan")), ValueError, "clip must be None or a finite float > 0"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m[:30] for _, _, m in BAD])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input(change, exc, match, impl):
    kw = dict(_good(), impl=impl)
    kw.update(change)
    with pytest.raises(exc, match=match):
        fdiv_weights(kw.pop("logp_pi"), kw.pop("logp_q"), kw.pop("log_target"), kw.pop("log_z"),
                     kw.pop("divergence"), **kw)


def test_cpu_triton_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\nfrom fdpg_scale.kernels import fdiv_weights\n"
            "x = torch.zeros(3)\n"
            "print('torch ok', fdiv_weights(x, x, x, 0.0, 'kl', impl='torch').log_t.tolist())\n"
            "try:\n    fdiv_weights(x, x, x, 0.0, 'kl', impl='triton')\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch ok [0.0, 0.0, 0.0]" in done.stdout
    assert "ERROR impl='triton' with logp_pi on the CPU needs the Triton interpreter" in done.stdout, done.stdout


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from fdpg_scale.kernels.fdiv_weights import _fdiv_fwd_kernel as kernel
assert not isinstance(kernel, InterpretedFunction), "built by the interpreter"

def signature(dt, mask):
    ptrs = dict(PI_ptr=dt, Q_ptr=dt, P_ptr=dt, MASK_ptr=mask, SCORES_ptr="*fp32", LOGZ_ptr="*fp32",
                BASE_ptr="*fp32", W_ptr="*fp32", R_ptr="*fp32", RATIO_ptr="*fp32", LOGT_ptr="*fp32")
    ints = dict.fromkeys(["B", "T", "stride_pi", "stride_q", "stride_p", "stride_mask", "stride_scores",
                          "stride_logz", "stride_base"], "i32")
    return {**ptrs, **ints, "kappa": "fp32", "c0": "fp32", "c1": "fp32", "outside_r": "fp32", "clip": "fp32"}

n = 0
for div in range(8):
    for tok, dt, mask in [(True, "*bf16", "*u8"), (False, "*fp32", "*fp32")]:
        cx = dict(DIVERGENCE=div, EXP_FORM=div == 0 or div >= 4, PI_TOK=tok, Q_TOK=tok, P_TOK=tok, HAS_MASK=tok, HAS_SCORES=tok,
                  HAS_CLIP=not tok, BLOCK_B=16, BLOCK_T=128)
        sig = {**signature(dt, mask), **dict.fromkeys(cx, "constexpr")}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx),
                                  target=GPUTarget("cuda", 90, 32))
        assert len(compiled.asm["cubin"]) > 1000
        n += 1
print("compiled", n)
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="this triton build ships no ptxas")
def test_kernel_compiles_for_a_gpu():
    """No GPU here: compile every divergence's kernel ahead of time for sm_90 (H100) down to a cubin.

    Catches what the interpreter lets through (constructs or types the GPU compiler rejects).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 16" in done.stdout
