"""Does the vLLM proposal engine train to the same alignment as the hf engine? (the vLLM engine's acceptance check)

    python benchmarks/engine_alignment.py --seeds 0 1 2 --out engine_alignment.json

For each seed and each engine, ``fdpg-scale train --config configs/demo.yaml`` runs on ``--nproc`` ranks
(torchrun, as a user starts it; ``sampling.engine=hf`` or ``vllm``, nothing else changed), then
``fdpg-scale eval`` draws ``--eval-samples`` sequences from the trained policy. The two engines draw
different samples from the same q (vLLM's sampler is not torch's), so runs of the same seed differ; what
must agree is the distribution of the result over seeds. Printed: one row per run (alignment ± its
evaluation standard error, KL(p‖π), wall time), then per engine the mean over seeds with its standard
error, and the difference vllm − hf with the standard error of a difference of two means.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fdpg_scale.apps.evaluate import evaluate_run  # noqa: E402
from fdpg_scale.experiments.runner import train_run  # noqa: E402

ENGINES = ("hf", "vllm")


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over seeds (NaN for one value: no spread to measure)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/demo.yaml")
    p.add_argument("--divergence", default="js")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--kv-cache-mib", type=int, default=256)
    p.add_argument("--work", type=Path, default=ROOT / "runs/engine_alignment")
    p.add_argument("--out", type=Path, default=Path("engine_alignment.json"))
    args = p.parse_args(argv)

    rows = []
    for seed in args.seeds:
        for engine in ENGINES:
            run_dir = args.work / engine / f"seed{seed}"
            overrides = [f"seed={seed}", f"sampling.engine={engine}", f"sampling.vllm.kv_cache_mib={args.kv_cache_mib}",
                         "logging.tensorboard=false"]
            start = time.perf_counter()
            train_run(args.config, run_dir, args.divergence, nproc=args.nproc, overrides=overrides)
            wall = time.perf_counter() - start
            ev = evaluate_run(run_dir, n=args.eval_samples)["policy"]
            rows.append({"engine": engine, "seed": seed, "alignment": ev["alignment"], "alignment_se": ev["alignment_se"],
                         "kl_p_pi": ev["kl_p_pi"], "kl_p_pi_se": ev["kl_p_pi_se"], "train_wall_s": wall})
            print(f"{engine:5s} seed {seed}: alignment {ev['alignment']:.3f} ± {ev['alignment_se']:.3f}, "
                  f"KL(p‖π) {ev['kl_p_pi']:.3f} ± {ev['kl_p_pi_se']:.3f}, trained in {wall:.0f} s", flush=True)

    summary = {}
    for engine in ENGINES:
        mine = [r for r in rows if r["engine"] == engine]
        summary[engine] = {k: _mean_se([r[k] for r in mine]) for k in ("alignment", "kl_p_pi", "train_wall_s")}
    diff = {k: (summary["vllm"][k][0] - summary["hf"][k][0],
                math.hypot(summary["vllm"][k][1], summary["hf"][k][1])) for k in ("alignment", "kl_p_pi")}

    print(f"\n{args.config.name}, {args.divergence}, {args.nproc} ranks, seeds {args.seeds}, "
          f"eval on {args.eval_samples} samples; mean ± standard error over seeds")
    print("| engine | alignment | KL(p‖π) | training wall s |")
    print("|---|---|---|---|")
    for engine in ENGINES:
        s = summary[engine]
        print(f"| {engine} | {s['alignment'][0]:.3f} ± {s['alignment'][1]:.3f} | {s['kl_p_pi'][0]:.3f} ± "
              f"{s['kl_p_pi'][1]:.3f} | {s['train_wall_s'][0]:.0f} |")
    print(f"| vllm − hf | {diff['alignment'][0]:+.3f} ± {diff['alignment'][1]:.3f} | "
          f"{diff['kl_p_pi'][0]:+.3f} ± {diff['kl_p_pi'][1]:.3f} | |")
    args.out.write_text(json.dumps({"config": str(args.config), "divergence": args.divergence, "nproc": args.nproc,
                                    "eval_samples": args.eval_samples, "runs": rows, "summary": summary,
                                    "difference_vllm_minus_hf": diff}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
