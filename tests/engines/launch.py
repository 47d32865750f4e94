"""Run a worker script on N processes with torchrun (gloo, CPU) and fail loudly with its output.

Workers write their results (losses, tensors) under a directory the test gives them and the test compares
them. ``torchrun --standalone`` picks a free rendezvous port, so concurrent test runs do not collide.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for worker processes: CPU accelerator, this checkout's extension cache, 1 thread."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    # Variables of an outer launcher would make the workers think they are someone else's ranks.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(script: str | Path, nprocs: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
            str(WORKERS / script if not Path(script).is_absolute() else script), *map(str, args)]


def run_workers(script: str, nprocs: int, *args: str, timeout: float = 300) -> str:
    """Run ``tests/engines/workers/<script>`` on ``nprocs`` ranks; returns the combined output, raises on failure."""
    proc = subprocess.run(torchrun_cmd(script, nprocs, *args), env=worker_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} on {nprocs} ranks exited with {proc.returncode}:\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    return proc.stdout + proc.stderr
