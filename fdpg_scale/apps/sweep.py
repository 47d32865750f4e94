"""``fdpg-scale sweep``: train and evaluate every (config, divergence) pair, then write ``report.md``.

Each pair trains in its own processes (``torchrun --standalone`` with ``--nproc`` ranks, or one process),
exactly as a user would start it, into ``OUT/<config name>/<divergence>``; a pair whose run is complete is
not retrained (the trainer resumes and finds nothing left to do), so an interrupted sweep continues where it
stopped. Configs stand for tasks and model sizes; on a cluster the same pairs run as a SLURM job array. The
runs go through the reproduction's runner (``fdpg_scale.experiments.runner.run_sweep``).
"""

from __future__ import annotations

from fdpg_scale.experiments.runner import check_sweep, run_sweep

__all__ = ["run"]


def run(args) -> int:
    """``fdpg-scale sweep --configs A.yaml [B.yaml ...] [--divergences ...] [key=value ...]`` (arguments parsed
    by ``fdpg_scale.apps.cli``)."""
    check_sweep(args.configs, args.divergences, nproc=args.nproc, eval_samples=args.eval_samples,
                overrides=args.overrides)
    report = run_sweep(args.configs, args.divergences, args.out, nproc=args.nproc, eval_samples=args.eval_samples,
                       overrides=args.overrides)
    print(f"report: {report}")
    return 0
