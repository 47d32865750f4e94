"""Step-size calibration: learning rate × samples per step at a fixed sample budget, per divergence and seed.

    python benchmarks/calibrate_steps.py --config configs/demo.yaml --divergences kl js tv \
        --lrs 1e-5 3e-5 1e-4 --batches 32 128 --budget 1920 --seeds 0 1 2 --out runs/calibrate

Each cell trains ``budget / batch`` steps of ``batch`` sequences (``fdpg-scale train`` in its own process, one
rank) and is evaluated by ``fdpg-scale eval`` (fresh draws per seed; KL(p‖π) from 2048 base draws, and the
rejection-sampled gain KL(p‖a) − KL(p‖π) for a pointwise constraint). A finished cell (its eval.json exists) is
not run again. Prints a Markdown table (mean ± sd over seeds, and on how many seeds the run ended closer to
p than the base) and writes ``OUT/calibration.json`` and ``OUT/calibration.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fdpg_scale.experiments.runner import train_run  # noqa: E402


def _cell_dir(out: Path, divergence: str, lr: float, batch: int, seed: int) -> Path:
    return out / f"{divergence}_lr{lr:g}_b{batch}_s{seed}"


def run_cell(config: Path, out: Path, divergence: str, lr: float, batch: int, seed: int, budget: int,
             eval_samples: int, overrides: list[str]) -> dict:
    """Train and evaluate one cell; returns its record (the eval's figures and the cell's settings)."""
    run_dir = _cell_dir(out, divergence, lr, batch, seed)
    if not (run_dir / "eval.json").is_file():
        steps = budget // batch
        train_run(config, run_dir, divergence, nproc=1,
                  overrides=[f"train.lr={lr}", f"train.global_batch={batch}", f"train.steps={steps}", f"seed={seed}",
                             f"train.save_every={steps}", *overrides])
        log = run_dir.parent / f"{run_dir.name}.eval.log"
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "eval", str(run_dir), "--samples",
                                   str(eval_samples)], stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluating {run_dir} failed; see {log}")
    ev = json.loads((run_dir / "eval.json").read_text())
    return {"divergence": divergence, "lr": lr, "batch": batch, "seed": seed, "steps": budget // batch,
            "kl_p_a": ev["base"]["kl_p_pi"], "kl_p_pi": ev["policy"]["kl_p_pi"],
            "kl_p_pi_se": ev["policy"]["kl_p_pi_se"], "kl_p_pi_draws": ev["policy"]["kl_p_pi_draws"],
            "kl_gain_rs": ev.get("kl_gain_rs"), "kl_gain_rs_se": ev.get("kl_gain_rs_se"),
            "alignment_base": ev["base"].get("alignment"), "alignment": ev["policy"].get("alignment"),
            "distinct_2": ev["policy"]["distinct_2"]}


def summarise(records: list[dict]) -> list[dict]:
    """One row per (divergence, lr, batch): means and sds over seeds, and the seeds that ended closer to p."""
    rows = []
    key = lambda r: (r["divergence"], r["lr"], r["batch"])  # noqa: E731
    for (divergence, lr, batch), group in itertools.groupby(sorted(records, key=key), key=key):
        group = list(group)
        gain = [r["kl_p_a"] - r["kl_p_pi"] for r in group]
        rs = [r["kl_gain_rs"] for r in group if r["kl_gain_rs"] is not None]
        align = [r["alignment"] for r in group if r["alignment"] is not None]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
        rows.append({"divergence": divergence, "lr": lr, "batch": batch, "seeds": len(group),
                     "gain": statistics.fmean(gain), "gain_sd": sd(gain), "min_gain": min(gain),
                     "closer": sum(g > 0 for g in gain), "gain_rs": statistics.fmean(rs) if rs else None,
                     "alignment": statistics.fmean(align) if align else None,
                     "kl_p_a": statistics.fmean(r["kl_p_a"] for r in group)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| divergence | lr | samples/step | seeds | KL(p‖a) − KL(p‖π), IS (mean ± sd) | min over seeds | "
             "rejection-sampled gain | seeds closer to p | alignment |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rs = "–" if r["gain_rs"] is None else f"{r['gain_rs']:.3f}"
        align = "–" if r["alignment"] is None else f"{r['alignment']:.3f}"
        lines.append(f"| {r['divergence']} | {r['lr']:g} | {r['batch']} | {r['seeds']} | {r['gain']:.3f} ± "
                     f"{r['gain_sd']:.3f} | {r['min_gain']:.3f} | {rs} | {r['closer']}/{r['seeds']} | {align} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Gain in KL(p‖·) against lr, one line per (divergence, samples per step), error bars = sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    key = lambda r: (r["divergence"], r["batch"])  # noqa: E731
    for (divergence, batch), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = sorted(group, key=lambda r: r["lr"])
        ax.errorbar([r["lr"] for r in group], [r["gain"] for r in group], yerr=[r["gain_sd"] for r in group],
                    marker="o", capsize=3, label=f"{divergence}, {batch} samples/step")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("KL(p‖a) − KL(p‖π) (nats; > 0: closer to p)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--divergences", nargs="+", default=["kl", "js", "tv"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 3e-5, 1e-4])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--budget", type=int, default=1920, help="samples per run (steps = budget / batch)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="cells run at a time")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "calibrate")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    for b in args.batches:
        if args.budget % b:
            ap.error(f"--budget {args.budget} is not a multiple of batch {b}")
    args.out.mkdir(parents=True, exist_ok=True)
    cells = list(itertools.product(args.divergences, args.lrs, args.batches, args.seeds))
    with ThreadPoolExecutor(args.workers) as pool:
        records = list(pool.map(lambda c: run_cell(args.config, args.out, *c, budget=args.budget,
                                                   eval_samples=args.eval_samples, overrides=args.overrides), cells))
    rows = summarise(records)
    (args.out / "calibration.json").write_text(json.dumps({"records": records, "rows": rows}, indent=1))
    plot(rows, args.out / "calibration.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
