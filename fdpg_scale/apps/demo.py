"""``fdpg-scale demo``: the first command's job, offline on a CPU in minutes.

1. pretrain the base model on the Python standard library's own sources (``fdpg-scale pretrain-base``;
   cached, so a second demo skips it);
2. align it to the pointwise task of ``configs/demo.yaml`` with f-DPG under DeepSpeed ZeRO-3 on 2 CPU ranks,
   once per divergence (forward KL, reverse KL, Jensen–Shannon by default);
3. evaluate base and policies and write ``report.md``: the results table, alignment against diversity per
   divergence, and KL(p‖π) per step (``fdpg_scale.experiments.runner.run_sweep``).
"""

from __future__ import annotations

import subprocess
import sys
import time

from fdpg_scale.experiments.runner import run_sweep

__all__ = ["run"]


def run(args) -> int:
    """``fdpg-scale demo [--out DIR] [--divergences ...] [--nproc N] [--config FILE] [key=value ...]``
    (arguments parsed by ``fdpg_scale.apps.cli``)."""
    start = time.perf_counter()
    print("[demo] 1/3 base model: pretrain-base (cached after the first run)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "pretrain-base"])
    if proc.returncode != 0:
        return proc.returncode
    print(f"[demo] 2/3 f-DPG with {', '.join(args.divergences)} on {args.nproc} ranks (DeepSpeed ZeRO-3), "
          f"then evaluation", flush=True)
    report = run_sweep([args.config], args.divergences, args.out, nproc=args.nproc, eval_samples=args.eval_samples,
                       overrides=args.overrides)
    print(f"[demo] 3/3 report: {report} (plots beside it); total {time.perf_counter() - start:.0f} s", flush=True)
    return 0
