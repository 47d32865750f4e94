#!/usr/bin/env bash
# The project's GPU check in one command, on one CUDA GPU (≤ 10 minutes): compiled kernel tests, kernels at
# V·H > 2^31 and N·V > 2^31 against float64, time and peak memory against naive/CCE/Liger, dW repeatability,
# HF bf16 log-probs against the fused ones, a 1-GPU bf16 smoke training (tokens/s).
#   bash scripts/gpu_check.sh [OUT_DIR]        (default benchmarks/results/gpu_check)
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (the table, also printed). Needs .venv
# (scripts/setup.sh) with the CUDA build of torch; CCE and Liger rows run only where they are installed.
# What each section does and its pass criteria: benchmarks/gpu_check.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-benchmarks/results/gpu_check}"
mkdir -p "$out"
python="${FDPG_PYTHON:-$root/.venv/bin/python}"
# Compiled kernels, not the interpreter; DeepSpeed's JIT ops cached in this checkout.
export TRITON_INTERPRET=0 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
exec timeout 600 "$python" benchmarks/gpu_check.py --device cuda --out "$out/gpu_check.json"
