"""``fdpg-scale sweep``: train and evaluate every (config, divergence) pair, then write ``report.md``.

Each pair trains in its own processes (``torchrun --standalone`` with ``--nproc`` ranks, or one process),
exactly as a user would start it, into ``OUT/<config name>/<divergence>``; a pair whose run is complete is
not retrained (the trainer resumes and finds nothing left to do), so an interrupted sweep continues where it
stopped. Configs stand for tasks and model sizes; on a cluster the same pairs run as a SLURM job array.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fdpg_scale.apps.evaluate import evaluate_run
from fdpg_scale.apps.report import load_run, results_table, write_report

__all__ = ["train_run", "run_sweep", "run"]


def _train_command(config: Path, output_dir: Path, divergence: str, nproc: int, overrides: list[str]) -> list[str]:
    name, _, alpha = divergence.partition(":")
    args = ["-m", "fdpg_scale.cli", "train", "--config", str(config), f"output_dir={output_dir}",
            f"divergence.name={name}", "logging.progress_bar=false", *overrides]
    if alpha:
        args.append(f"divergence.alpha={alpha}")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def train_run(config: Path, run_dir: Path, divergence: str, *, nproc: int = 1, overrides: list[str] = ()) -> None:
    """Train ``config`` with ``divergence`` into ``run_dir`` in its own processes (its log beside it, in
    ``<run_dir>.log``); a complete run is resumed and finds nothing to do. Raises RuntimeError naming the log."""
    env = dict(os.environ)
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(_train_command(config, run_dir, divergence, nproc, list(overrides)),
                              stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {config.stem} with {divergence} failed (exit {proc.returncode}); see {log}")


def run_sweep(configs: list[Path], divergences: list[str], out: Path, *, nproc: int = 1, eval_samples: int = 256,
              overrides: list[str] = ()) -> Path:
    """Train + evaluate each (config, divergence), write ``out/report.md`` and return its path.

    divergences: names, ``alpha:0.5`` for an α-divergence. overrides: ``key=value`` for every run.
    """
    out.mkdir(parents=True, exist_ok=True)
    groups = {}
    for config in configs:
        runs = []
        for divergence in divergences:
            run_dir = out / config.stem / divergence.replace(":", "")
            start = time.perf_counter()
            train_run(config, run_dir, divergence, nproc=nproc, overrides=overrides)
            evaluate_run(run_dir, n=eval_samples)
            print(f"[sweep] {config.stem} / {divergence}: trained and evaluated in "
                  f"{time.perf_counter() - start:.0f} s ({run_dir})", flush=True)
            runs.append(load_run(run_dir))
        groups[config.stem] = runs
        print(f"\n{config.stem}\n{results_table(runs)}\n", flush=True)
    return write_report(groups, out)


def run(args) -> int:
    """``fdpg-scale sweep --configs A.yaml [B.yaml ...] [--divergences ...] [key=value ...]`` (arguments parsed
    by ``fdpg_scale.apps.cli``)."""
    for config in args.configs:
        if not config.is_file():
            raise FileNotFoundError(f"sweep: config file not found: {config}")
    report = run_sweep(args.configs, args.divergences, args.out, nproc=args.nproc, eval_samples=args.eval_samples,
                       overrides=args.overrides)
    print(f"report: {report}")
    return 0
