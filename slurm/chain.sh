#!/bin/bash
# Submit train → eval → export as three jobs linked by afterok dependencies; prints the three job ids.
#   slurm/chain.sh [sbatch options for training --] CONFIG OUTPUT_DIR [key=value ...]
# eval writes into OUTPUT_DIR (fdpg-scale eval); export writes OUTPUT_DIR/hf (fdpg-scale export --to).
# The eval and export logs go to FDPG_LOG_DIR (default: the submit directory).
set -euo pipefail
SBATCH_OPTS=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do SBATCH_OPTS+=("$1"); shift; done
    shift
fi
[ $# -ge 2 ] || { echo "chain.sh: usage: [sbatch options --] CONFIG OUTPUT_DIR [key=value ...]" >&2; exit 2; }
CONFIG="$1"; OUT="$2"; shift 2
HERE="$(dirname "$0")"
STEP_LOG="${FDPG_LOG_DIR:-.}/slurm-%x-%j.out"
TRAIN=$(sbatch --parsable ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} "$HERE/train.sbatch" "$CONFIG" "output_dir=$OUT" "$@")
TRAIN="${TRAIN%%;*}"
EVAL=$(sbatch --parsable --dependency="afterok:$TRAIN" --kill-on-invalid-dep=yes --output="$STEP_LOG" "$HERE/step.sbatch" eval "$OUT" \
       ${FDPG_EVAL_ARGS:-})
EVAL="${EVAL%%;*}"
EXPORT=$(sbatch --parsable --dependency="afterok:$EVAL" --kill-on-invalid-dep=yes --output="$STEP_LOG" "$HERE/step.sbatch" export "$OUT" \
         --to "$OUT/hf")
echo "$TRAIN $EVAL ${EXPORT%%;*}"
