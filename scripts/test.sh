#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite; extra arguments go to pytest.
#   bash scripts/test.sh          the whole suite (what CI runs)
#   bash scripts/test.sh --fast   only the tests not marked slow: unit tests of every module, no torchrun, no
#                                 CLI training run, no SLURM cluster, no vLLM engine (minutes instead of half an hour);
#                                 its set-up leaves out the vllm extra, which no such test needs
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
select=()
setup_args=()
pytest_args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        select=(-m "not slow")
        setup_args=(--without-vllm)
    else
        pytest_args+=("$arg")
    fi
done
bash scripts/setup.sh ${setup_args[@]+"${setup_args[@]}"}
# Triton kernels run on CPU tensors through the interpreter in tests; it must be on before triton.jit runs.
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$root/.cache/torch_extensions"
# DeepSpeed's C++ shared-memory op, built once here, before any test: a test process killed while building it
# (a timeout, a test that kills ranks) leaves the build's lock file behind, and every later DeepSpeed start in
# this checkout then waits on it forever. Nothing else builds here now, so a lock without the built op is stale.
shm="$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm"
if [ -e "$shm/lock" ] && ! ls "$shm"/*.so >/dev/null 2>&1; then rm -f "$shm/lock"; fi
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
# One pytest worker per CPU core (pytest-xdist), each test file whole on one worker: a file's module fixtures
# (the SLURM test cluster, in-process engines) are then set up once. Most slow tests wait on one-thread
# subprocesses, so two files side by side keep both cores busy. `-n 0` (an extra argument) runs one process.
exec .venv/bin/python -m pytest tests -q -n logical --dist loadfile ${select[@]+"${select[@]}"} \
    ${pytest_args[@]+"${pytest_args[@]}"}
