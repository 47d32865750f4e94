"""Proposal-engine benchmark: tokens/s of generation and of a whole step, hf gathered vs hf sharded vs
vLLM, with the real trainer at 2 ranks.

    python benchmarks/bench_engines.py --out bench_engines.json                       # small GPT-2 built here
    python benchmarks/bench_engines.py --model-dir .cache/models/stdlib-gpt2 --out demo.json   # the demo's base

Each engine is one run of ``python -m fdpg_scale.cli train --config configs/smoke.yaml`` (torchrun, --world
ranks) with ``sampling.engine`` / ``sampling.generation_mode`` set, for --steps steps at a fixed global batch
(micro-batch = global / world, no accumulation). From ``metrics.jsonl`` it reports the medians over steps
2.. (step 1 pays first-touch costs and, for vLLM, the first weight push) of:

- generation tokens/s = generated tokens / ``time/generation`` (sampling only);
- step tokens/s = ``tokens_per_s`` (generated tokens / the whole step: sampling, scoring, log π, backward,
  and vLLM's weight refreshes);
- ``time/refresh``: seconds spent pushing q into the engines, and how many steps pushed at all (off-policy a
  push happens only after q was replaced; ``--on-policy`` pushes every step).

The wall time of each run (start-up included: vLLM's engine takes ~1 minute to start on 2 CPU cores) is
reported beside. Timings on a shared CPU are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _env, _n_params, _run, _torchrun, build_small_gpt2  # noqa: E402

ENGINES = {"hf-gathered": ["sampling.engine=hf", "sampling.generation_mode=gathered"],
           "hf-sharded": ["sampling.engine=hf", "sampling.generation_mode=sharded"],
           "vllm": ["sampling.engine=vllm"]}


def bench_engine(name: str, model_dir: Path, work: Path, args) -> dict:
    """One trainer run with engine ``name`` -> medians over steps 2.. (see module docstring)."""
    out_dir = work / f"train_{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [f"model.path={model_dir}", "model.build=null", f"output_dir={out_dir}", f"seed={args.seed}",
                 f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
                 f"train.micro_batch={args.global_batch // args.world}", f"train.save_every={args.steps}",
                 "train.keep_checkpoints=1", f"train.on_policy={str(args.on_policy).lower()}",
                 f"train.proposal_update_interval={args.proposal_update_interval}",
                 f"sampling.max_new_tokens={args.max_new_tokens}", f"sampling.vllm.kv_cache_mib={args.kv_cache_mib}",
                 "logging.tensorboard=false", "logging.progress_bar=false", *ENGINES[name]]
    train = ["-m", "fdpg_scale.cli", "train", "--config", "configs/smoke.yaml", *overrides]
    cmd = [sys.executable, *train] if args.world == 1 else _torchrun(args.world, train)
    wall = _run(cmd, _env(args.world), f"trainer with {name}", args.timeout)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows[1:] if not r.get("skipped")]
    if not timed:
        raise RuntimeError(f"{name}: no timed (non-skipped) step after the first; raise --steps")
    return {"engine": name, "wall_s": wall, "steps_timed": len(timed),
            "tokens_per_step": statistics.median(r["tokens"] for r in timed),
            "gen_tokens_per_s": statistics.median(r["tokens"] / r["time/generation"] for r in timed),
            "step_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "time_generation_s": statistics.median(r["time/generation"] for r in timed),
            "time_step_s": statistics.median(r["time/step"] for r in timed),
            "refresh_steps": sum("time/refresh" in r for r in timed),
            "time_refresh_s": statistics.median([r["time/refresh"] for r in timed if "time/refresh" in r] or [0.0]),
            "alignment_last": rows[-1].get("alignment")}


def print_report(result: dict) -> None:
    m, s = result["model"], result["settings"]
    print(f"\n## Proposal engines ({m['name']}, {m['n_params'] / 1e6:.2f} M params; {s['world']} ranks on "
          f"{result['cpu_count']} cores; global batch {s['global_batch']}, ≤ {s['max_new_tokens']} new tokens/seq; "
          f"{'on' if s['on_policy'] else 'off'}-policy; medians of steps 2..{s['steps']})")
    print("| engine | generation tok/s | step tok/s | generation s | step s | refresh s (steps) | run wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["engines"]:
        print(f"| {r['engine']} | {r['gen_tokens_per_s']:.0f} | {r['step_tokens_per_s']:.0f} | "
              f"{r['time_generation_s']:.3f} | {r['time_step_s']:.3f} | {r['time_refresh_s']:.3f} "
              f"({r['refresh_steps']}/{r['steps_timed']}) | {r['wall_s']:.0f} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--model-dir", default=None,
                    help="a local HF model directory (default: a small GPT-2 built here, --n-layer × --n-embd)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="trainer steps per run (the first is not timed)")
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--on-policy", action="store_true", help="sample from π (vLLM: a weight push every step)")
    ap.add_argument("--proposal-update-interval", type=int, default=1,
                    help="steps between replacement checks of q (off-policy; a replacement means a vLLM push)")
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM KV cache per engine")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where models and runs go (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per trainer run")
    args = ap.parse_args(argv)
    args.engines = args.engines.split(",")
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; valid: {', '.join(ENGINES)}")
    if args.steps < 2:
        raise SystemExit(f"--steps must be ≥ 2 (the first step is not timed), got {args.steps}")
    if args.global_batch % args.world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --world {args.world}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench_engines_") if args.workdir is None else None
    work = Path(tmp.name if tmp else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.model_dir is None:
            model_dir = build_small_gpt2(work / "small-gpt2", n_layer=args.n_layer, n_embd=args.n_embd,
                                         n_head=args.n_head, n_positions=max(64, args.max_new_tokens + 8))
            name = f"small GPT-2 {args.n_layer}×{args.n_embd}"
        else:
            model_dir = Path(args.model_dir)
            name = model_dir.name
        result = {"cpu_count": os.cpu_count(), "model": {"name": name, "n_params": _n_params(model_dir)},
                  "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}, "engines": []}
        for engine in args.engines:
            print(f"trainer with {engine} ...", flush=True)
            result["engines"].append(bench_engine(engine, model_dir, work, args))
    finally:
        if tmp is not None:
            tmp.cleanup()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_report(result)
    return result


if __name__ == "__main__":
    main()
