"""``fdpg-scale toy``: sampled f-DPG on the enumerable toy, with the *exact* divergences printed as it trains.

    fdpg-scale toy [--divergences kl rkl] [--steps 80] [--batch 256] [--seed 0]
    fdpg-scale toy --record docs/toy_convergence.md      # the recorded convergence table
    fdpg-scale toy --proposal-rules                      # proposal decisions against the exact answer

The trainer and the recorded curves live in ``fdpg_scale.toy.demo``; this module is the command.
"""

from __future__ import annotations

import json
import math
import sys
import time

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.toy.demo import ToyFDPG, make_problem, record, single_thread

__all__ = ["run", "main"]


def _check_args(args) -> None:
    for key in ("steps", "batch", "print_every"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be ≥ 1, got {getattr(args, key)}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")


def run(args) -> int:
    """``fdpg-scale toy [--divergences ...] [--steps N] ...`` (arguments parsed by ``fdpg_scale.apps.cli``)."""
    _check_args(args)
    with single_thread():
        return _main(args)


def main(argv: list[str] | None = None) -> int:
    """``fdpg-scale toy`` with its own arguments ``argv`` (default ``sys.argv[1:]``)."""
    from fdpg_scale.apps.cli import main as cli_main

    return cli_main(["toy", *(sys.argv[1:] if argv is None else argv)])


def _main(args) -> int:
    if args.proposal_rules:
        from fdpg_scale.toy.proposal_rules import AGREEMENT_SETTINGS, agreement_rates

        print(json.dumps({"settings": AGREEMENT_SETTINGS, **agreement_rates()}, indent=1))
        return 0
    if args.record:
        record(args.record)
        print(f"wrote {args.record}")
        return 0
    try:
        divergences = [get_divergence(n, alpha=args.alpha if n == "alpha" else None) for n in args.divergences]
    except ValueError as e:
        raise SystemExit(f"--divergences: {e}") from None
    problem = make_problem(args.target, seed=args.seed)
    print(f"toy: {problem.base.num_sequences} sequences (K={problem.base.vocab_size}, L={problem.base.max_len}), "
          f"target {problem.kind}, exact log Z = {problem.log_z:.4f}; {args.steps} steps × {args.batch} samples, "
          f"{'on' if args.on_policy else 'off'}-policy, Adam lr {args.lr}")
    summary = []
    for d in divergences:
        t0 = time.perf_counter()
        fdpg = ToyFDPG(problem, d, batch=args.batch, lr=args.lr, on_policy=args.on_policy, seed=args.seed)
        start = fdpg.exact()
        print(f"\n[{d}] step {0:4d}  samples {0:6d}  D_f(π‖p) {start['divergence']:.5f}  "
              f"KL(p‖π) {start['kl_p_pi']:.5f}")
        for _ in range(args.steps):
            fdpg.step()
            if fdpg.steps % args.print_every == 0 or fdpg.steps == args.steps:
                ex = fdpg.exact()
                print(f"[{d}] step {fdpg.steps:4d}  samples {fdpg.samples:6d}  D_f(π‖p) {ex['divergence']:.5f}  "
                      f"KL(p‖π) {ex['kl_p_pi']:.5f}  log Z err {ex['log_z_error']:+.4f}  "
                      f"q version {fdpg.proposal_version}")
        end = fdpg.exact()
        summary.append((str(d), start, end, fdpg.samples, time.perf_counter() - t0))
    print("\n| divergence | D_f start | D_f end | KL(p‖π) start | KL(p‖π) end | KL drop | samples | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s, e, n, sec in summary:
        drop = 1.0 - e["kl_p_pi"] / s["kl_p_pi"] if s["kl_p_pi"] > 0 else math.nan
        print(f"| {name} | {s['divergence']:.5f} | {e['divergence']:.5f} | {s['kl_p_pi']:.5f} | "
              f"{e['kl_p_pi']:.5f} | {drop:.1%} | {n} | {sec:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
