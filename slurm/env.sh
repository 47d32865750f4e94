# Environment of every fdpg-scale job, sourced by the batch scripts (never installs anything).
# Site-specific set-up goes here (module load ..., a scratch dir); every value can be preset by the
# submitting shell, since sbatch exports the submission environment by default.
#
# FDPG_PYTHON: the interpreter of the jobs: the one exported at submission, else the active virtual
# environment's (VIRTUAL_ENV), else python3 on PATH. It must already have fdpg-scale installed.
if [ -z "${FDPG_PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then FDPG_PYTHON="$VIRTUAL_ENV/bin/python"; else FDPG_PYTHON="$(command -v python3)"; fi
fi
export FDPG_PYTHON
# Processes per node: the node's GPUs, 1 on a CPU-only node (overridable: NPROC_PER_NODE=4 sbatch ...).
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
    else NPROC_PER_NODE=1; fi
fi
export NPROC_PER_NODE
# Threads per process: the CPUs SLURM gave each task, divided among its processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE : 1 ))}"
# DeepSpeed's JIT-built C++ ops: one cache per checkout, not per user (DeepSpeed's default cache is per user).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$FDPG_ROOT/.cache/torch_extensions}"
