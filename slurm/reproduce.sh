#!/bin/bash
# Submit `fdpg-scale reproduce` as three linked jobs: prepare (pretrain the bases, write the prompts), a job
# array with one task per run of the grid, then the report (report.md, results.json); prints the three ids.
#   slurm/reproduce.sh [sbatch options for every job --] OUT [--quick | --grid FILE]
# The array's size comes from `fdpg-scale reproduce --count`; each stage waits for the previous one (afterok).
# The report job needs every run: if some array task failed, resubmit the array's failed indices
# (sbatch --array=I,J slurm/reproduce.sbatch --out OUT), then the report
# (sbatch slurm/reproduce.sbatch --out OUT --report).
set -euo pipefail
SBATCH_OPTS=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do SBATCH_OPTS+=("$1"); shift; done
    shift
fi
[ $# -ge 1 ] || { echo "reproduce.sh: usage: [sbatch options --] OUT [--quick | --grid FILE]" >&2; exit 2; }
OUT="$1"; shift
HERE="$(dirname "$0")"
# The grid's size, with the jobs' interpreter; env.sh is sourced in a subshell so that its per-job values
# (OMP_NUM_THREADS, ...) are not exported to the jobs from here.
N=$(FDPG_ROOT="${FDPG_ROOT:-$PWD}"; source "${FDPG_ROOT}/slurm/env.sh"; "$FDPG_PYTHON" -m fdpg_scale.cli reproduce \
    --out "$OUT" "$@" --count)
PREP=$(sbatch --parsable --job-name=fdpg-reproduce-prepare ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} \
       "$HERE/reproduce.sbatch" --out "$OUT" "$@" --prepare)
PREP="${PREP%%;*}"
ARRAY=$(sbatch --parsable --array="0-$(( N - 1 ))" --dependency="afterok:$PREP" --kill-on-invalid-dep=yes \
        ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} "$HERE/reproduce.sbatch" --out "$OUT" "$@")
ARRAY="${ARRAY%%;*}"
REPORT=$(sbatch --parsable --job-name=fdpg-reproduce-report --dependency="afterok:$ARRAY" --kill-on-invalid-dep=yes \
         ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} "$HERE/reproduce.sbatch" --out "$OUT" "$@" --report)
echo "$PREP $ARRAY ${REPORT%%;*}"
