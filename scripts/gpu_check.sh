#!/usr/bin/env bash
# The first GPU check, on a bare node without a package index, in one call of at most 540 s.
#   bash scripts/gpu_check.sh --wheels DIR --out DIR [--python PY] [--venv DIR] [--budget SECONDS]
#   bash scripts/gpu_check.sh --dry-run --out DIR [--sections a,b]   # every section's code on CPU (.venv)
# --wheels: the bundle from scripts/offline_wheels.sh (built where the index is reachable). PY (default python3)
# is the node's interpreter with its torch, triton and transformers. The check makes a virtual environment
# that sees PY's site-packages (--system-site-packages), installs the bundle with --no-index and this project
# with --no-deps, then runs benchmarks/gpu_check.py: the sections, their order and limits are described there.
# DIR receives install.json, summary.json and summary.md (rewritten after every section) and sections/.
# Without a GPU it says so in one line, writes its summary and exits 0.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$(date +%s)
die() { echo "gpu_check: $*" >&2; exit 2; }
wheels="" out="" python="python3" venv="$root/.gpu_check_venv" budget=540 dry=0 sections=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels|--out|--python|--venv|--budget|--sections)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --wheels) wheels="$2" ;; --out) out="$2" ;; --python) python="$2" ;; --venv) venv="$2" ;;
                --budget) budget="$2" ;; --sections) sections="$2" ;;
            esac
            shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) die "unknown argument $1 (usage: scripts/gpu_check.sh --wheels DIR --out DIR | --dry-run --out DIR)" ;;
    esac
done
[ -n "$out" ] || die "--out DIR is required"
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got $budget"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Compiled kernels, not the interpreter; autotune results and compiled kernels cached across the sections'
# processes (Triton's cache); DeepSpeed's JIT ops cached in this checkout.
export TRITON_INTERPRET=0 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$root/.cache/triton}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
sec_args=()
[ -z "$sections" ] || sec_args=(--sections "$sections")

if [ "$dry" = 1 ]; then
    export DS_ACCELERATOR=cpu
    exec "${FDPG_PYTHON:-$root/.venv/bin/python}" benchmarks/gpu_check.py --dry-run --out "$out" \
        --budget "$budget" "${sec_args[@]}"
fi

# No GPU: one line and the summary, before installing anything.
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    exec "$python" benchmarks/gpu_check.py --no-gpu --out "$out"
fi
[ -n "$wheels" ] || die "--wheels DIR (scripts/offline_wheels.sh) is required on a GPU node"
[ -d "$wheels" ] || die "--wheels $wheels is not a directory"

# Install: the bundle without an index (what the node already has is kept), the bundle's setuptools inside the
# venv (an image's old one may not build editable installs), then the project without dependencies.
# Its record is install.json.
log="$out/install.log"
install_status=ok
{
    "$python" -m venv --system-site-packages "$venv" \
    && "$venv/bin/python" -m pip install --no-index --find-links "$wheels" --disable-pip-version-check \
        $(grep -v '^#' "$wheels/BUNDLE.txt" | cut -d= -f1) \
    && "$venv/bin/python" -m pip install --no-index --find-links "$wheels" --disable-pip-version-check \
        --upgrade setuptools \
    && "$venv/bin/python" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check \
        -e "$root" \
    && "$venv/bin/python" -c "import deepspeed, fdpg_scale.kernels, transformers; print('imports ok')"
} > "$log" 2>&1 || install_status=failed
"$python" - "$out/install.json" "$install_status" "$(( $(date +%s) - started ))" "$log" <<'PY'
import json, sys
path, status, seconds, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), open(sys.argv[4]).read()
json.dump({"status": status, "seconds": seconds, "log_tail": log[-3000:]}, open(path, "w"), indent=1)
PY
echo "gpu_check: install $install_status in $(( $(date +%s) - started )) s (log: $log)"
if [ "$install_status" != ok ]; then
    "$python" benchmarks/gpu_check.py --sections , --out "$out" >/dev/null 2>&1 || true  # summary: install failed
    tail -20 "$log" >&2
    die "the bundle did not install (summary and log in $out)"
fi
left=$(( budget - ($(date +%s) - started) ))
exec timeout "$(( left + 10 ))" "$venv/bin/python" benchmarks/gpu_check.py --out "$out" --budget "$left" \
    "${sec_args[@]}"
