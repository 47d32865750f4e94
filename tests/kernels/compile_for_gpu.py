"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and print what the PTX holds.

Triton's compiler (and the ptxas it ships) needs no GPU to build a kernel for a given target; only running
it does. Run as a script with TRITON_INTERPRET unset (the interpreter replaces @triton.jit at import):

    python tests/kernels/compile_for_gpu.py linear_bwd ATOMIC_SEM=relaxed DOT=bf16 [CAPABILITY=90]

prints one JSON object: {"atomics": sorted PTX atom.* instructions, "ptx_lines": n}.
"""

from __future__ import annotations

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fdpg_scale.kernels.linear_logprobs import _linear_bwd_kernel, _linear_fwd_kernel

_INT_ARGS = {"N", "V", "HD", "V_PER_SPLIT", "stride_hn", "stride_hk", "stride_wv", "stride_wk", "ignore_index"}
_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def compile_linear(kernel_name: str, opts: dict[str, str], capability: int):
    fn = {"linear_fwd": _linear_fwd_kernel, "linear_bwd": _linear_bwd_kernel}[kernel_name]
    dot = opts.get("DOT", "bf16")
    consts = dict(HAS_BIAS=False, DOT_DTYPE=_DTYPES[dot], INPUT_PRECISION="ieee", BLOCK_N=64, BLOCK_V=128,
                  BLOCK_K=64)
    if fn is _linear_bwd_kernel:
        consts.update(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=False, ATOMIC_SEM=opts.get("ATOMIC_SEM", "acq_rel"))
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name == "T_ptr":
            signature[name] = "*i64"
        elif name in ("H_ptr", "W_ptr", "B_ptr"):
            signature[name] = f"*{dot}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in _INT_ARGS:
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32))


def main(argv: list[str]) -> None:
    kernel_name, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    compiled = compile_linear(kernel_name, opts, int(opts.get("CAPABILITY", "90")))
    ptx = compiled.asm["ptx"]
    print(json.dumps({"atomics": sorted(set(re.findall(r"atom\.[\w.]+", ptx))), "ptx_lines": ptx.count("\n")}))


if __name__ == "__main__":
    main(sys.argv[1:])
