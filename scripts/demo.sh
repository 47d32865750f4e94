#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on the embedded default: CPU, offline, minutes.
# Extra arguments go to `fdpg-scale toy`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/fdpg-scale toy "$@"
