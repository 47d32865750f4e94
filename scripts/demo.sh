#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on the embedded default: CPU, offline, minutes.
# Extra arguments go to `fdpg-scale demo` (e.g. --divergences kl rkl js tv, train.steps=60).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/fdpg-scale demo "$@"
