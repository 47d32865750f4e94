#!/usr/bin/env bash
# Creates (once) the project-local virtual environment .venv and installs fdpg-scale into it, editable,
# with the exact versions of requirements/lock.txt. A second run installs nothing: it compares a stamp of
# the lock file and pyproject.toml with what was installed last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${FDPG_BOOTSTRAP_PYTHON:-python3}"
stamp=".venv/.fdpg-scale-installed"
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing fdpg-scale and its pinned dependencies into .venv (about a minute)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[test]' 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" || true
  .venv/bin/python -c "import fdpg_scale.kernels, deepspeed, transformers" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
