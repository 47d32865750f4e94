#!/usr/bin/env bash
# The fast test tier (pytest -m "not slow") on a GPU image's versions, on CPU: a separate virtual environment
# with torch's CPU build, triton and transformers at the versions of a typical GPU node (defaults: Python 3.12,
# torch 2.11.0, triton 3.6.0, transformers 5.17.0), the offline bundle's other packages, and this checkout.
#   bash scripts/compat_check.sh [--python PY] [--venv DIR] [--wheels DIR] [-- PYTEST_ARGS...]
# Versions: FDPG_COMPAT_TORCH (default "torch==2.11.0+cpu"), FDPG_COMPAT_TORCH_INDEX (default PyTorch's CPU
# index, https://download.pytorch.org/whl/cpu: PyPI's Linux torch is the CUDA build), FDPG_COMPAT_TRITON
# ("triton==3.6.0"), FDPG_COMPAT_TRANSFORMERS ("transformers==5.17.0"). --wheels: a bundle from
# scripts/offline_wheels.sh, installed with --no-index after the image's packages (what gpu_check.sh does on
# the node); without it the rest comes from the index, the image's versions held.
# The last line printed is pytest's count line.
#
# FDPG_COMPAT_HOLD (default "numpy<2.4"): triton 3.6's interpreter, which the fast tier's kernel tests run,
# converts 1-element arrays with int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted
# to Python scalars": 143 kernel tests failed that way); compiled kernels on a GPU are not affected.
#
# Results (2026-12-07, the 2-core development machine):
# - torch 2.11: NOT RUN. download.pytorch.org does not resolve from that machine and PyPI has no CPU build of
#   torch 2.11 for Linux; run it where that index is reachable and record the count line here.
# - Python 3.11.7, torch 2.13.0+cpu (the local wheel), triton 3.6.0, transformers 5.17.0, numpy 2.3.5
#   (FDPG_COMPAT_TORCH="torch==2.13.0+cpu" FDPG_COMPAT_TORCH_INDEX="" --python python3.11):
#   987 passed, 52 skipped (the compiled-GPU tests), 70 deselected (slow), 0 failed, in 152 s.
#   With numpy 2.4.6 instead: 143 failed (the interpreter issue above), 844 passed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
die() { echo "compat_check: $*" >&2; exit 2; }
python="python3.12" venv="$root/.compat_venv" wheels=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || die "--python needs a value"; python="$2"; shift 2 ;;
        --venv) [ $# -ge 2 ] || die "--venv needs a value"; venv="$2"; shift 2 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a value"; wheels="$2"; shift 2 ;;
        --) shift; break ;;
        *) die "unknown argument $1" ;;
    esac
done
command -v "$python" >/dev/null || die "no interpreter $python (give --python)"
torch_spec="${FDPG_COMPAT_TORCH:-torch==2.11.0+cpu}"
torch_index="${FDPG_COMPAT_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"  # set and empty: the default index
triton_spec="${FDPG_COMPAT_TRITON:-triton==3.6.0}"
transformers_spec="${FDPG_COMPAT_TRANSFORMERS:-transformers==5.17.0}"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

rm -rf "$venv"
"$python" -m venv "$venv"
echo "compat_check: $("$venv/bin/python" --version), $torch_spec, $triton_spec, $transformers_spec"
# The image: torch (CPU build), triton, transformers, accelerate. A machine-wide pip constraint that caps
# torch elsewhere would refuse these versions: this environment ignores it.
export PIP_CONSTRAINT=""
if [ -n "$torch_index" ]; then
    "${pip[@]}" --index-url "$torch_index" "$torch_spec"
else
    "${pip[@]}" "$torch_spec"
fi
hold="${FDPG_COMPAT_HOLD-numpy<2.4}"
"${pip[@]}" "$triton_spec" "$transformers_spec" accelerate ${hold:+"$hold"}
# The rest: the bundle without an index (as on the node), or the index with the image's versions held
# (requirements/lock.txt is not used: it pins packages, such as huggingface_hub, beside another transformers).
printf '%s\n' "${torch_spec%%+*}" "$triton_spec" "$transformers_spec" ${hold:+"$hold"} > "$venv/image.txt"
if [ -n "$wheels" ]; then
    "${pip[@]}" --no-index --find-links "$wheels" $(grep -v '^#' "$wheels/BUNDLE.txt" | cut -d= -f1) \
        scipy matplotlib 2>/dev/null \
        || "${pip[@]}" --no-index --find-links "$wheels" $(grep -v '^#' "$wheels/BUNDLE.txt" | cut -d= -f1)
    "${pip[@]}" --no-deps --no-build-isolation -e .
else
    "${pip[@]}" -c "$venv/image.txt" -e '.[test]'
fi
"$venv/bin/python" -c "import torch, triton, transformers, deepspeed; print('compat_check: installed', \
torch.__version__, triton.__version__, transformers.__version__, deepspeed.__version__)"
TRITON_INTERPRET=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$root/.cache/torch_extensions" \
    "$venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@" 2>&1 | tail -n 30
