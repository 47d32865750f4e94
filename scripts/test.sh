#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite; extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# Triton kernels run on CPU tensors through the interpreter in tests; it must be on before triton.jit runs.
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$root/.cache/torch_extensions"
exec .venv/bin/python -m pytest tests -q "$@"
