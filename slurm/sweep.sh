#!/bin/bash
# Submit a divergence × size sweep as one job array: one array task per (config, divergence) pair.
#   FDPG_DIVERGENCES="kl rkl js tv" slurm/sweep.sh [sbatch options --] OUT_ROOT CONFIG [CONFIG ...] [key=value ...]
# Each task trains slurm/train.sbatch CONFIG divergence.name=D output_dir=OUT_ROOT/<config stem>-D [key=value ...]
# and, like any train.sbatch job, is requeued and resumes on preemption. Prints the array job id.
set -euo pipefail
SBATCH_OPTS=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do SBATCH_OPTS+=("$1"); shift; done
    shift
fi
[ $# -ge 2 ] || { echo "sweep.sh: usage: [sbatch options --] OUT_ROOT CONFIG [CONFIG ...] [key=value ...]" >&2; exit 2; }
OUT_ROOT="$1"; shift
CONFIGS=(); OVERRIDES=()
for arg in "$@"; do if [[ "$arg" == *=* ]]; then OVERRIDES+=("$arg"); else CONFIGS+=("$arg"); fi; done
read -r -a DIVS <<< "${FDPG_DIVERGENCES:-kl rkl js tv}"
for c in "${CONFIGS[@]}"; do [ -f "$c" ] || { echo "sweep.sh: config $c does not exist" >&2; exit 2; }; done
N=$(( ${#CONFIGS[@]} * ${#DIVS[@]} ))
export FDPG_SWEEP_CONFIGS="${CONFIGS[*]}" FDPG_SWEEP_DIVERGENCES="${DIVS[*]}" FDPG_SWEEP_OUT="$OUT_ROOT"
sbatch --parsable --array="0-$(( N - 1 ))" --job-name=fdpg-sweep ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} \
    "$(dirname "$0")/sweep.sbatch" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
