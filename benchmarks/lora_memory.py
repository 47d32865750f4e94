"""Peak resident memory per rank of a real training run: full fine-tuning against LoRA (``model.lora``).

Builds a GPT-2-shaped model locally (random init; the tiny tokenizer's vocabulary, so ``--layers``/``--hidden``
set the size: 12 × 768 is 85 M parameters), then runs ``fdpg-scale train`` (the smoke config: a pointwise
target, one optimizer step and its checkpoint) under torchrun on 1 and 2 ranks, once as full fine-tuning (π,
q and a are three ZeRO-3 models) and once with ``model.lora.r`` (one base, two adapters). Each rank reports
its own peak RSS (``getrusage``'s ``ru_maxrss``: the whole process, imports included) when the run ends.

    .venv/bin/python benchmarks/lora_memory.py --out benchmarks/results/lora_memory.json

Prints a table (peak RSS of the largest rank, MiB; LoRA / full) and writes the JSON. CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "lora")


def build_model(path: Path, *, layers: int, hidden: int, heads: int, seed: int = 0) -> int:
    """A GPT-2-shaped model with the tiny tokenizer at ``path``; -> its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from fdpg_scale.models.tiny import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=64, tie_word_embeddings=True,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def train_args(model: Path, out: Path, mode: str, r: int) -> list[str]:
    """The ``fdpg-scale train`` arguments of one measured run."""
    args = ["train", "--config", str(ROOT / "configs" / "smoke.yaml"), f"model.path={model}", "model.build=null",
            f"output_dir={out}", "train.steps=1", "train.global_batch=4", "train.micro_batch=2",
            "sampling.max_new_tokens=8", "logging.tensorboard=false", "logging.progress_bar=false"]
    return args + ([f"model.lora.r={r}"] if mode == "lora" else [])


def worker(report: Path, args: list[str]) -> None:
    """One rank: the CLI's training run, then this process's peak RSS into ``report``/rank_<RANK>.json."""
    from fdpg_scale import cli

    status = cli.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    (report / f"rank_{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"status": status,
                                                                                 "peak_rss_bytes": peak}))
    if status:
        raise SystemExit(status)


def measure(model: Path, tmp: Path, mode: str, ranks: int, r: int) -> list[int]:
    """Peak RSS (bytes) of each rank of one run."""
    report = tmp / f"report_{mode}_{ranks}"
    report.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(__file__).resolve()), "--worker", str(report), "--",
           *train_args(model, tmp / f"run_{mode}_{ranks}", mode, r)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} on {ranks} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((report / f"rank_{k}.json").read_text())["peak_rss_bytes"] for k in range(ranks)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON file for the results")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("train", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        worker(a.worker, a.train)
        return 0
    mib = 2 ** 20
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        tmp = Path(tmp)
        params = build_model(tmp / "model", layers=a.layers, hidden=a.hidden, heads=a.heads)
        rows = []
        for ranks in a.ranks:
            peaks = {mode: measure(tmp / "model", tmp, mode, ranks, a.r) for mode in MODES}
            rows.append({"ranks": ranks, **{f"{m}_peak_rss_per_rank_bytes": peaks[m] for m in MODES},
                         "lora_over_full": max(peaks["lora"]) / max(peaks["full"])})
    print(f"GPT-2 shape, {a.layers} layers × {a.hidden} hidden: {params / 1e6:.1f} M parameters, fp32, LoRA r={a.r}")
    print(f"{'ranks':>5} | {'full: peak RSS per rank (MiB)':>30} | {'LoRA: peak RSS per rank (MiB)':>30} | LoRA / full")
    for row in rows:
        full = ", ".join(f"{v / mib:.0f}" for v in row["full_peak_rss_per_rank_bytes"])
        lora = ", ".join(f"{v / mib:.0f}" for v in row["lora_peak_rss_per_rank_bytes"])
        print(f"{row['ranks']:>5} | {full:>30} | {lora:>30} | {row['lora_over_full']:.3f}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"parameters": params, "layers": a.layers, "hidden": a.hidden, "lora_r": a.r,
                                     "dtype": "fp32", "device": "cpu", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
