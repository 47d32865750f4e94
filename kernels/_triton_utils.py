"""Small helpers shared by the Triton launchers: impl choice and interpreter detection."""

from __future__ import annotations

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

IMPLS = ("auto", "triton", "torch")


def is_interpreted(kernel) -> bool:
    """True when this kernel object was built by the Triton interpreter.

    ``@triton.jit`` reads TRITON_INTERPRET when the decorator runs and returns an InterpretedFunction
    (runs on CPU tensors) or a JITFunction (compiles for a GPU). Asking the kernel object itself is the
    truth at launch time, whatever the environment variable says now.
    """
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'torch' elsewhere; checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda else "torch"
    return impl


def check_triton_device(kernel, name: str, x: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``x``'s device."""
    if x.is_cuda:
        if is_interpreted(kernel):
            raise RuntimeError(f"impl='triton': {name} is a CUDA tensor but the Triton kernels were built by "
                               f"the interpreter (TRITON_INTERPRET=1 when fdpg_scale.kernels was imported); "
                               f"unset it or pass CPU tensors")
        return
    if x.device.type != "cpu":
        raise RuntimeError(f"impl='triton' needs a CUDA or CPU tensor; {name} is on {x.device}")
    if not is_interpreted(kernel):
        raise RuntimeError(f"impl='triton' with {name} on the CPU needs the Triton interpreter: set "
                           f"TRITON_INTERPRET=1 before fdpg_scale.kernels is imported, or use impl='torch'")
