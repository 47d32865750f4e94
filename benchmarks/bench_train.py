"""Trainer benchmark: throughput at world sizes 1/2/4, ZeRO-3 memory per rank, fused head vs logits.

    python benchmarks/bench_train.py --out bench_train.json              # full run on this machine
    python benchmarks/bench_train.py --quick --out /tmp/quick.json       # smoke (the test's settings)

Three parts, each in subprocesses (``torchrun --standalone``, so concurrent runs never share a port):

1. **Throughput**: the real trainer (``python -m fdpg_scale.cli train --config configs/smoke.yaml`` with
   overrides) on a "small GPT-2" this script builds (GPT2Config, --n-layer × --n-embd, the tiny tokenizer's
   vocabulary) for --steps steps at a FIXED global batch (--global-batch sequences, micro-batch = global /
   world, no accumulation), once per world size in --worlds. Reads ``metrics.jsonl`` and reports the median
   over steps 2.. (step 1 pays first-touch and trace recording) of tokens/s and of each ``time/<phase>``
   (generation, scoring, logprobs, backward). With world > 1 each rank gets OMP_NUM_THREADS=1; a world size
   above the machine's cores oversubscribes them, and the table says so.
2. **Memory per rank** under ZeRO-3 (``_train_bench_worker.py memory``): parameter shards + optimizer state
   (fp32 partitions, Adam moments) counted from the engine's tensors after one step, at each world size,
   checked against the goal ``bytes(world N) ≤ 1.1 × bytes(world 1) / N`` (max over ranks; PASS/FAIL printed,
   never asserted).
3. **Fused head vs materialised logits** (``_train_bench_worker.py head``): one optimizer step of the same
   engine on the same batch through ``sequence_logprobs`` (fused) and through HF logits → log_softmax →
   gather, time and peak memory side by side, on whatever device the worker's DeepSpeed accelerator is
   (CPU here; on a GPU: ``torch.cuda.max_memory_allocated``). The model for this part has --head-vocab
   tokens (default GPT-2's 50257: the head's cost scales with V) and random token ids.

Timings on a shared CPU are noisy: compare ratios measured in one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_train_bench_worker.py"
GOAL_FACTOR = 1.1


# ----------------------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------------------

def build_small_gpt2(path: Path, *, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                     vocab: int | None = None, seed: int = 0) -> Path:
    """A GPT-2 HF directory with the tiny model's tokenizer files and special-token ids.

    vocab None: the tiny tokenizer's vocabulary (the trainer can sample and decode with it); an int: that
    many embedding rows (for the head comparison, which feeds random ids and never decodes).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fdpg_scale.models.tiny import build_tiny_model_dir

    tiny = path.parent / "tiny-gpt2"
    build_tiny_model_dir(tiny, arch="gpt2", seed=seed)
    cfg = GPT2Config.from_pretrained(tiny)
    cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions = n_layer, n_embd, n_head, n_positions
    if vocab is not None:
        if vocab < cfg.vocab_size:
            raise ValueError(f"--head-vocab {vocab} must be ≥ the tokenizer's vocabulary {cfg.vocab_size}")
        cfg.vocab_size = vocab
    cfg.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, path / f.name)
    return path


def _n_params(path: Path) -> int:
    """Parameters stored in the directory's model.safetensors (GPT-2's tied head counted once)."""
    from safetensors import safe_open

    n = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for key in f.keys():
            size = 1
            for dim in f.get_slice(key).get_shape():
                size *= dim
            n += size
    return n


# ----------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------

def _env(world: int) -> dict:
    """A trainer's or worker's environment: no outer launcher's rank variables (each run is its own job)."""
    from fdpg_scale.distributed.launch import child_env

    env = child_env()
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.pop("TRITON_INTERPRET", None)  # the interpreter is a test tool, not a CPU path
    if world > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _torchrun(world: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args]


def _run(cmd: list[str], env: dict, what: str, timeout: float) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# The three parts
# ----------------------------------------------------------------------------------------------------------

def bench_throughput(model_dir: Path, work: Path, world: int, args) -> dict:
    """Real trainer run at one world size -> medians over steps 2.. of tokens/s and time/<phase>."""
    out_dir = work / f"train_w{world}"
    shutil.rmtree(out_dir, ignore_errors=True)
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by world size {world}")
    overrides = [f"model.path={model_dir}", "model.build=null", f"output_dir={out_dir}",
                 f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
                 f"train.micro_batch={args.global_batch // world}", f"train.save_every={args.steps}",
                 "train.keep_checkpoints=1", f"sampling.max_new_tokens={args.max_new_tokens}",
                 "logging.tensorboard=false", "logging.progress_bar=false"]
    train = ["-m", "fdpg_scale.cli", "train", "--config", "configs/smoke.yaml", *overrides]
    cmd = [sys.executable, *train] if world == 1 else _torchrun(world, train)
    wall = _run(cmd, _env(world), f"trainer at world {world}", args.timeout)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("skipped")]
    if len(rows) < 2:
        raise RuntimeError(f"world {world}: {len(rows)} non-skipped steps in metrics.jsonl; need ≥ 2 (raise --steps)")
    timed = rows[1:]
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    return {"world": world, "steps_timed": len(timed), "wall_s": wall,
            "oversubscribed": world > (os.cpu_count() or 1),
            "tokens_per_step": statistics.median(r["tokens"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            **{p: statistics.median(r.get(p, 0.0) for r in timed) for p in phases}}


def bench_memory(model_dir: Path, work: Path, world: int, args) -> dict:
    out = work / f"memory_w{world}.json"
    cmd = _torchrun(world, [str(WORKER), "memory", "--model-dir", str(model_dir), "--out", str(out)])
    _run(cmd, _env(world), f"memory worker at world {world}", args.timeout)
    res = json.loads(out.read_text())
    totals = [r["params"] + r["optimizer"] for r in res["per_rank"]]
    return {"world": world, "per_rank": res["per_rank"], "max_rank_bytes": max(totals)}


def check_memory_goal(rows: list[dict]) -> None:
    """Adds goal_bytes / ratio / verdict to each row (against world 1; needs world 1 among the rows)."""
    base = next((r for r in rows if r["world"] == 1), None)
    for r in rows:
        if base is None:
            r.update(goal_bytes=None, ratio_to_ideal=None, verdict="no world-1 baseline")
            continue
        ideal = base["max_rank_bytes"] / r["world"]
        r.update(goal_bytes=GOAL_FACTOR * ideal, ratio_to_ideal=r["max_rank_bytes"] / ideal,
                 verdict="PASS" if r["max_rank_bytes"] <= GOAL_FACTOR * ideal else "FAIL")


def bench_head(model_dir: Path, work: Path, args) -> dict:
    out = work / "head.json"
    cmd = _torchrun(1, [str(WORKER), "head", "--model-dir", str(model_dir), "--out", str(out),
                        "--batch", str(args.head_batch), "--seq", str(args.head_seq), "--reps", str(args.head_reps),
                        "--rounds", str(args.head_rounds)])
    _run(cmd, _env(1), "head worker", args.timeout)
    res = json.loads(out.read_text())
    res["time_ratio_fused_over_naive"] = res["fused"]["min_s"] / res["naive"]["min_s"]
    res["mem_ratio_fused_over_naive"] = res["fused"]["peak_mb"] / max(res["naive"]["peak_mb"], 1e-9)
    res["fwd_bwd_mem_ratio_fused_over_naive"] = (res["fused"]["peak_fwd_bwd_mb"]
                                                 / max(res["naive"]["peak_fwd_bwd_mb"], 1e-9))
    return res


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def print_report(result: dict) -> None:
    cores = result["cpu_count"]
    print(f"\n## Throughput (trainer, small GPT-2 {result['model']['n_layer']}×{result['model']['n_embd']}, "
          f"{result['model']['n_params'] / 1e6:.2f} M params, global batch {result['settings']['global_batch']}, "
          f"≤ {result['settings']['max_new_tokens']} new tokens/seq, "
          f"median of steps 2..{result['settings']['steps']})")
    tp = result["throughput"]
    phases = sorted({k for r in tp for k in r if k.startswith("time/")})
    base = next((r["tokens_per_s"] for r in tp if r["world"] == 1), None)
    print("| world | tokens/s | vs world 1 | " + " | ".join(f"{p} s" for p in phases) + " | note |")
    print("|---" * (4 + len(phases)) + "|")
    for r in tp:
        rel = f"{r['tokens_per_s'] / base:.2f}×" if base else "-"
        note = f"oversubscribed: {r['world']} ranks on {cores} cores" if r["oversubscribed"] else ""
        print(f"| {r['world']} | {r['tokens_per_s']:.1f} | {rel} | "
              + " | ".join(f"{r.get(p, 0.0):.3f}" for p in phases) + f" | {note} |")
    print("\n## ZeRO-3 memory per rank (params + optimizer state, after one step; max over ranks)")
    print("| world | params MB | optimizer MB | total MB | ideal (w1/N) MB | ratio | goal ≤ 1.1 |")
    print("|---|---|---|---|---|---|---|")
    mb = 2 ** 20
    for r in result["memory"]:
        worst = max(r["per_rank"], key=lambda x: x["params"] + x["optimizer"])
        ideal = "-" if r["goal_bytes"] is None else f"{r['goal_bytes'] / GOAL_FACTOR / mb:.3f}"
        ratio = "-" if r["ratio_to_ideal"] is None else f"{r['ratio_to_ideal']:.3f}"
        print(f"| {r['world']} | {worst['params'] / mb:.3f} | {worst['optimizer'] / mb:.3f} | "
              f"{r['max_rank_bytes'] / mb:.3f} | {ideal} | {ratio} | {r['verdict']} |")
    h = result["head"]
    print(f"\n## One optimizer step: fused head vs materialised logits ({h['device_name']}, B={h['batch']}, "
          f"T={h['seq']}, V={h['vocab']}, {h['n_layer']}×{h['n_embd']}; memory = {h['memory_measure']}; "
          f"max |Δ log π| = {h['logprob_max_abs_diff']:.2e})")
    print("| path | min s | median s | peak extra MB, fwd+bwd | peak extra MB, whole step |")
    print("|---|---|---|---|---|")
    for p in ("fused", "naive"):
        print(f"| {p} | {h[p]['min_s']:.4f} | {h[p]['median_s']:.4f} | {h[p]['peak_fwd_bwd_mb']:.1f} | "
              f"{h[p]['peak_mb']:.1f} |")
    print(f"fused / naive: time (min) {h['time_ratio_fused_over_naive']:.3f}, memory fwd+bwd "
          f"{h['fwd_bwd_mem_ratio_fused_over_naive']:.3f}, memory whole step {h['mem_ratio_fused_over_naive']:.3f}")
    if any(r["oversubscribed"] for r in tp):
        print(f"\nNote: this machine has {cores} cores; world sizes above that oversubscribe them "
              f"(OMP_NUM_THREADS=1 per rank), so their tokens/s measures contention, not scaling.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="smallest settings (the test's smoke run)")
    ap.add_argument("--worlds", default=None, help="comma-separated world sizes for the trainer runs (default 1,2,4)")
    ap.add_argument("--mem-worlds", default=None, help="world sizes for the memory check (default: --worlds)")
    ap.add_argument("--steps", type=int, default=None,
                    help="trainer steps per run (default 10; the first is not timed)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per optimizer step, the same at every world size (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="sampled tokens per sequence (default 48)")
    ap.add_argument("--n-layer", type=int, default=None, help="small GPT-2 layers (default 4)")
    ap.add_argument("--n-embd", type=int, default=None, help="small GPT-2 width (default 256)")
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--head-vocab", type=int, default=None,
                    help="vocabulary of the head-comparison model (default 50257)")
    ap.add_argument("--head-batch", type=int, default=None, help="sequences in the head-comparison step (default 8)")
    ap.add_argument("--head-seq", type=int, default=None, help="tokens per sequence there (default 64)")
    ap.add_argument("--head-reps", type=int, default=None, help="timed steps per block (default 3)")
    ap.add_argument("--head-rounds", type=int, default=None, help="[fused, naive] block pairs (default 2)")
    ap.add_argument("--workdir", default=None, help="where models and runs go (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    args = ap.parse_args(argv)
    # quick / full defaults, for every option left unset
    quick = dict(worlds="1", mem_worlds="1,2", steps=2, global_batch=8, max_new_tokens=6, n_layer=2, n_embd=64,
                 head_vocab=2048, head_batch=2, head_seq=16, head_reps=1, head_rounds=1)
    full = dict(worlds="1,2,4", mem_worlds=None, steps=10, global_batch=16, max_new_tokens=48, n_layer=4,
                n_embd=256, head_vocab=50257, head_batch=8, head_seq=64, head_reps=3, head_rounds=2)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mem_worlds is None:
        args.mem_worlds = args.worlds

    def worlds(text, name):
        try:
            ws = [int(w) for w in text.split(",")]
        except ValueError:
            raise SystemExit(f"{name} must be comma-separated integers, got {text!r}") from None
        if not ws or min(ws) < 1:
            raise SystemExit(f"{name} must list world sizes ≥ 1, got {text!r}")
        return ws

    args.worlds = worlds(args.worlds, "--worlds")
    args.mem_worlds = worlds(args.mem_worlds, "--mem-worlds")
    if args.steps < 2:
        raise SystemExit(f"--steps must be ≥ 2 (the first step is not timed), got {args.steps}")
    if args.n_embd % args.n_head:
        raise SystemExit(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        # Prompts are BOS only (unconditional target): 1 + max_new_tokens positions; the head step needs head_seq.
        n_pos = max(64, args.max_new_tokens + 8, args.head_seq)
        small = build_small_gpt2(work / "small-gpt2", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                 n_positions=n_pos)
        head_model = build_small_gpt2(work / "head-gpt2", n_layer=args.n_layer, n_embd=args.n_embd,
                                      n_head=args.n_head, n_positions=n_pos, vocab=args.head_vocab)
        result = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "settings": {
                      k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
                  "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_params": _n_params(small)},
                  "throughput": [], "memory": []}
        for w in args.worlds:
            print(f"trainer, world {w} ...", flush=True)
            result["throughput"].append(bench_throughput(small, work, w, args))
        for w in args.mem_worlds:
            print(f"ZeRO-3 memory, world {w} ...", flush=True)
            result["memory"].append(bench_memory(small, work, w, args))
        check_memory_goal(result["memory"])
        print("fused head vs logits ...", flush=True)
        result["head"] = bench_head(head_model, work, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_report(result)
    return result


if __name__ == "__main__":
    main()
