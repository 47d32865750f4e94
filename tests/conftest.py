"""Test-session set-up shared by every test.

The Triton interpreter must be switched on before the first ``@triton.jit`` decorator runs (it is read then),
so it is set here, at collection time, for the whole session: kernels then run on CPU tensors when a test
asks for ``impl="triton"``. The library itself never reads this variable to change behaviour.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed's JIT-built C++ ops are cached per user by default; keep this checkout's builds apart.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                           ".cache", "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """The tiny GPT-2 and its tokenizer that ``model.build: tiny-gpt2`` builds (seed 0), built once per test
    session: CLI runs given ``model.path=`` it reuse it. Read-only: a test that edits a model edits a copy."""
    from fdpg_scale.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", seed=0)
