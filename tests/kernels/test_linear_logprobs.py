"""Fused linear + log-prob Triton kernels (kernels/linear_logprobs.py), run through the interpreter.

Against the naive float64 formula and against the torch reference: odd sizes (partial blocks in N, H
and V), a vocabulary ≥ 131072, leading shape [B, T], masked targets and a fully masked row, T ≠ 1,
extreme logits, a random upstream gradient, fp32 and bf16, bias, frozen weight; every output written
(the launcher NaN-fills its buffers) and ≤ 0; the clear error for CPU tensors without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fdpg_scale.kernels import linear_token_logprobs
from fdpg_scale.kernels.linear_logprobs import (LinearLogprobsParams, linear_logprobs_forward,
                                                 _linear_fwd_kernel)
from fdpg_scale.kernels._triton_utils import is_interpreted
from tests.helpers import assert_close
from tests.kernels.helpers import banned_token_case, grads, make_linear_case, naive_linear_logprobs

pytestmark = pytest.mark.skipif(not is_interpreted(_linear_fwd_kernel),
                                reason="needs TRITON_INTERPRET=1 at import (tests/conftest.py sets it)")


def check_outputs(out: torch.Tensor) -> None:
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), "an output element was not written (NaN poison) or overflowed"
    assert (out <= 0).all()


def test_odd_sizes_fp32_bias_temperature_mask_random_grad():
    hidden, weight, bias, targets, grad = make_linear_case(lead=(3, 13), hd=67, vocab=1031, masked_row=2)
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, impl="triton")
    ref = naive_linear_logprobs(hidden, weight, targets, bias, 0.7)
    assert out.shape == (3, 13)
    check_outputs(out)
    assert_close(out, ref, name="logprobs")
    assert (out[2] == 0).all()
    got = grads(out, (hidden, weight, bias), grad)
    want = grads(ref, (hidden, weight, bias), grad)
    for name, g, r in zip("hwb", got, want):
        assert g.dtype == torch.float32
        assert_close(g, r, name=f"d{name}")
    assert (got[0][2] == 0).all()  # the fully masked row gets no gradient


def test_bf16_inputs():
    hidden, weight, bias, targets, grad = make_linear_case(lead=(37,), dtype=torch.bfloat16)
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=1.5, impl="triton")
    ref = naive_linear_logprobs(hidden, weight, targets, bias, 1.5)
    check_outputs(out)
    # Same rounded inputs as the oracle and fp32 dots in the interpreter: fp32-level forward error.
    assert_close(out, ref, rtol=1e-5, atol=2e-5, name="logprobs")
    for name, g, r in zip("hwb", grads(out, (hidden, weight, bias), grad), grads(ref, (hidden, weight, bias), grad)):
        assert g.dtype == torch.bfloat16
        # the interpreter truncates the fp32→bf16 cast of the result: bf16 tolerance (2^-7 relative)
        assert_close(g, r, dtype=torch.bfloat16, name=f"d{name}")


def test_large_vocab():
    hidden, weight, bias, targets, grad = make_linear_case(lead=(3,), hd=16, vocab=131101, seed=4)
    targets[2] = 131100
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, impl="triton")
    ref = naive_linear_logprobs(hidden, weight, targets, bias)
    check_outputs(out)
    assert_close(out, ref, name="logprobs")
    for name, g, r in zip("hwb", grads(out, (hidden, weight, bias), grad), grads(ref, (hidden, weight, bias), grad)):
        assert_close(g, r, name=f"d{name}")


def test_extreme_logits():
    hidden, weight, _, targets, grad = make_linear_case(lead=(19,), hd=33, vocab=300, scale=3e3, bias=False)
    out = linear_token_logprobs(hidden, weight, targets, impl="triton")
    ref = naive_linear_logprobs(hidden, weight, targets)
    assert ref.abs().max() > 1e3
    check_outputs(out)
    assert_close(out, ref, rtol=1e-5, atol=1e-2, name="logprobs")
    for name, g, r in zip("hw", grads(out, (hidden, weight), grad), grads(ref, (hidden, weight), grad)):
        assert torch.isfinite(g).all()
        assert_close(g, r, rtol=1e-4, atol=1e-2, name=f"d{name}")


def test_minus_inf_bias():
    # Whole leading vocab tiles of −inf (banned tokens): the online log-sum-exp must not turn them into NaN.
    hidden, weight, bias, targets, grad = banned_token_case()
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, impl="triton")
    ref = naive_linear_logprobs(hidden, weight, targets, bias)
    check_outputs(out)
    assert_close(out, ref, name="logprobs")
    for name, g, r in zip("hwb", grads(out, (hidden, weight, bias), grad), grads(ref, (hidden, weight, bias), grad)):
        assert torch.isfinite(g).all(), f"d{name}"
        assert_close(g, r, name=f"d{name}")


def test_matches_torch_impl_and_frozen_weight():
    hidden, weight, _, targets, grad = make_linear_case(lead=(2, 10), hd=40, vocab=517, bias=False, seed=5)
    weight.requires_grad_(False)
    out_tr = linear_token_logprobs(hidden, weight, targets, temperature=0.9, impl="triton")
    out_pt = linear_token_logprobs(hidden, weight, targets, temperature=0.9, impl="torch")
    assert_close(out_tr, out_pt, name="triton vs torch")
    (g_tr,) = torch.autograd.grad(out_tr, hidden, grad.float())
    (g_pt,) = torch.autograd.grad(out_pt, hidden, grad.float())
    assert_close(g_tr, g_pt, name="dh triton vs torch")


@pytest.mark.parametrize("splits", [1, 3])
def test_every_output_written(splits):
    # N=37 is not a multiple of BLOCK_N; the split combine reads a NaN-filled buffer, so a program that
    # failed to write its rows (or a split that covered no columns) would leave a NaN here.
    hidden, weight, bias, targets, _ = make_linear_case(lead=(37,), hd=20, vocab=700, seed=6)
    params = LinearLogprobsParams(temperature=1.0, num_splits=splits, block_n=16, block_v=64, block_k=16)
    with torch.no_grad():
        out, lse = linear_logprobs_forward(hidden, weight, bias, targets, params)
    check_outputs(out)
    assert torch.isfinite(lse).all()
    assert_close(out, naive_linear_logprobs(hidden, weight, targets, bias), name="logprobs")


def test_cpu_tensor_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from fdpg_scale.kernels import linear_token_logprobs, token_logprobs\n"
        "h, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.zeros(3, dtype=torch.long)\n"
        "for f, args, name in ((linear_token_logprobs, (h, w, t), 'hidden'),\n"
        "                      (token_logprobs, (torch.randn(3, 11), t), 'logits')):\n"
        "    try:\n"
        "        f(*args, impl='triton')\n"
        "    except RuntimeError as e:\n"
        "        assert name in str(e) and 'TRITON_INTERPRET=1' in str(e), str(e)\n"
        "    else:\n"
        "        raise SystemExit('no error for ' + name)\n"
        "    assert f(*args, impl='auto').shape == (3,)  # the CPU path itself still works\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


_AOT_SCRIPT = r'''
import importlib
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

L = importlib.import_module("fdpg_scale.kernels.linear_logprobs")
T = importlib.import_module("fdpg_scale.kernels.token_logprobs")
target = GPUTarget("cuda", 90, 32)  # H100


def compile_one(fn, sig, consts, cfg):
    k = triton.compile(ASTSource(fn, sig, constexprs={**consts, **cfg.kwargs}), target=target,
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert len(k.asm["cubin"]) > 0


for dt, dot in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    common = dict(H_ptr=f"*{dt}", W_ptr=f"*{dt}", B_ptr=f"*{dt}", T_ptr="*i64")
    shapes = dict(N="i32", V="i32", HD="i32")
    strides = dict(stride_hn="i32", stride_hk="i32", stride_wv="i32", stride_wk="i32", inv_t="fp32")
    blocks = dict(BLOCK_N="constexpr", BLOCK_V="constexpr", BLOCK_K="constexpr")
    fwd_sig = dict(**common, PLSE_ptr="*fp32", PPICK_ptr="*fp32", **shapes, V_PER_SPLIT="i32", **strides,
                   ignore_index="i32", HAS_BIAS="constexpr", DOT_DTYPE="constexpr", INPUT_PRECISION="constexpr", **blocks)
    compile_one(L._linear_fwd_kernel, fwd_sig, dict(HAS_BIAS=True, DOT_DTYPE=dot, INPUT_PRECISION="ieee"),
                L._FWD_CONFIGS[0])
    bwd_sig = dict(**common, LSE_ptr="*fp32", G_ptr="*fp32", DH_ptr="*fp32", DW_ptr="*fp32", DB_ptr="*fp32",
                   **shapes, **strides, ignore_index="i32", HAS_BIAS="constexpr", COMPUTE_DH="constexpr",
                   COMPUTE_DW="constexpr", COMPUTE_DB="constexpr", DOT_DTYPE="constexpr",
                   INPUT_PRECISION="constexpr", ATOMIC_SEM="constexpr", **blocks)
    for sem in L.ATOMIC_SEMS:
        compile_one(L._linear_bwd_kernel, bwd_sig, dict(HAS_BIAS=True, COMPUTE_DH=True, COMPUTE_DW=True,
                                                        COMPUTE_DB=True, DOT_DTYPE=dot, INPUT_PRECISION="ieee",
                                                        ATOMIC_SEM=sem),
                    L._BWD_CONFIGS[0])
    tok = dict(T_ptr="*i64")
    compile_one(T._token_fwd_kernel, dict(Z_ptr=f"*{dt}", **tok, OUT_ptr="*fp32", LSE_ptr="*fp32", V="i32",
                                          stride_zn="i32", inv_t="fp32", ignore_index="i32",
                                          BLOCK_V="constexpr"), {}, T._GPU_CONFIGS[0])
    compile_one(T._token_bwd_kernel, dict(Z_ptr=f"*{dt}", **tok, LSE_ptr="*fp32", G_ptr="*fp32",
                                          DZ_ptr=f"*{dt}", V="i32", stride_zn="i32", stride_dn="i32",
                                          inv_t="fp32", ignore_index="i32", BLOCK_V="constexpr"),
                {}, T._GPU_CONFIGS[0])
print("ok")
'''


def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    # The interpreter does not type-check what the GPU compiler does (constexpr plumbing, tl.dot operand
    # dtypes, loop-carried types); compiling to an sm_90 cubin (ptxas ships with triton) needs no GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_per_sequence_weight_broadcast_to_tokens(impl):
    # f-DPG's upstream gradient: one weight per sequence, broadcast over its tokens (a stride-0 gradient).
    hidden, weight, bias, targets, _ = make_linear_case(lead=(3, 11), hd=24, vocab=333, seed=7)
    seq_w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.8, impl=impl)
    ref = naive_linear_logprobs(hidden, weight, targets, bias, 0.8)
    got = torch.autograd.grad((out * seq_w[:, None].float()).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((ref * seq_w[:, None]).sum(), (hidden, weight, bias))
    for name, g, r in zip("hwb", got, want):
        assert_close(g, r, name=f"d{name}")
