#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite; extra arguments go to pytest.
#   bash scripts/test.sh          the whole suite (what CI runs)
#   bash scripts/test.sh --fast   only the tests not marked slow: unit tests of every module, no torchrun, no
#                                 CLI training run, no SLURM cluster, no vLLM engine (minutes instead of half an hour)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
select=()
pytest_args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        select=(-m "not slow")
    else
        pytest_args+=("$arg")
    fi
done
bash scripts/setup.sh
# Triton kernels run on CPU tensors through the interpreter in tests; it must be on before triton.jit runs.
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$root/.cache/torch_extensions"
exec .venv/bin/python -m pytest tests -q ${select[@]+"${select[@]}"} ${pytest_args[@]+"${pytest_args[@]}"}
