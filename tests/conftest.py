"""Test-session set-up shared by every test.

The Triton interpreter must be switched on before the first ``@triton.jit`` decorator runs (it is read then),
so it is set here, at collection time, for the whole session: kernels then run on CPU tensors when a test
asks for ``impl="triton"``. The library itself never reads this variable to change behaviour.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed's JIT-built C++ ops are cached per user by default; keep this checkout's builds apart.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                           ".cache", "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
