"""fdpg-scale against disco, the f-DPG authors' library, side by side: same base, target, step size, samples per
step, steps and seeds, one CPU process each, both evaluated by the package's own evaluation.

    python benchmarks/vs_disco.py --disco-source PATH/TO/disco --divergences kl js --seeds 0 1 2 \
        --steps 60 --batch 32 --lrs 3e-5 --out runs/vs_disco

disco (PyPI ``disco-generation``, licence CC BY-NC-SA 4.0) is never part of this repository: the first run
installs it into its own virtual environment (``--disco-env``, default ``.cache/bench-envs/disco``) with the
same pinned torch and transformers as the project (``requirements/lock.txt``), so both sides run the same
kernels. From ``--disco-source``, a local checkout of github.com/naver/disco, when given; otherwise PyPI's
``disco-generation==1.1.1``, whose sdist lacks ``disco/tuners/losses/misc`` and so fails its own import check:
the script then stops and asks for ``--disco-source``. The disco side runs in ``_disco_worker.py`` (which
documents the two small adaptations it needs).

Per (divergence, lr, seed) each side trains ``--steps`` steps of ``--batch`` samples from the config's base
(default configs/demo.yaml: the stdlib GPT-2 and the pointwise "contains `def `" constraint) and saves the
policy ``--eval-points`` times; every saved policy is evaluated by ``fdpg_scale.apps.evaluate`` (KL(p‖π) from
2048 base draws and its rejection-sampled counterpart, alignment), on the same draws for both sides of a seed.
Matched settings: lr, warm-up steps, samples per step and per backward pass, proposal checks every
``proposal_min_samples / batch`` steps on a window of as many samples. Each side keeps its own baseline,
gradient clipping (fdpg-scale's config; disco has none) and loss scaling: they are part of what is compared.

Speed, from the tokens sampled during training (up to and including each sample's EOS): tokens/s over the
training steps' wall-clock (fdpg-scale: the sum of its ``time/step``; disco: ``Tuner.tune`` less the saves),
and tokens per CPU second of the whole training process (start-up included), which load from other jobs on a
shared machine distorts far less than wall-clock; "faster" needs both. A finished run (its ``run.json``) is
not run again. Prints a Markdown table and writes ``OUT/vs_disco.json`` and ``OUT/vs_disco.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = Path(__file__).resolve().parent / "_disco_worker.py"
#: PyPI's latest release (it declares Python < 3.11; installed with --ignore-requires-python on newer ones).
DISCO_PYPI = "disco-generation==1.1.1"
#: What disco needs to import ``disco.tuners``, ``disco.distributions`` and ``disco.scorers`` and to load a model
#: (accelerate: disco passes a ``device_map``); its other declared dependencies (spacy, notebook, neptune-client,
#: wandb) serve its loggers and tutorials only.
DISCO_DEPENDENCIES = ("torch", "transformers", "accelerate", "numpy", "scipy", "tqdm", "datasets", "safetensors")
IMPLS = ("fdpg-scale", "disco")


# ------------------------------------------------------------------------------------ disco's environment
def disco_install_commands(env: Path, python: str, source: Path | None) -> list[list[str]]:
    """The commands that build disco's environment ``env`` with interpreter ``python``: a venv, disco's
    runtime dependencies pinned by the project's lock, then disco itself without its declared dependencies."""
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    disco = [str(source)] if source is not None else ["--ignore-requires-python", DISCO_PYPI]
    return [[python, "-m", "venv", str(env)],
            [*pip, "-c", str(ROOT / "requirements" / "lock.txt"), *DISCO_DEPENDENCIES],
            [*pip, "--no-deps", "--force-reinstall", *disco]]


def ensure_disco(env: Path, python: str, source: Path | None) -> Path:
    """Install disco into ``env`` unless it already holds the same source; returns the environment's Python.

    Raises SystemExit with the next step when a command fails or disco cannot be imported afterwards."""
    env = env.absolute()
    interpreter = env / "bin" / "python"
    stamp = env / ".vs-disco-source"
    want = str(source.resolve()) if source is not None else DISCO_PYPI
    if interpreter.is_file() and stamp.is_file() and stamp.read_text() == want:
        return interpreter
    for cmd in disco_install_commands(env, python, source):
        if cmd[1:3] == ["-m", "venv"] and interpreter.is_file():
            continue
        print(f"[vs_disco] {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # pip's notes about unreadable extra index locations of this machine's pip.conf are noise here
        print("".join(line for line in proc.stdout.splitlines(keepends=True)
                      if not line.startswith("WARNING: Location ")), end="", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"vs_disco: installing disco into {env} failed at: {' '.join(cmd)}")
    # Run from the environment's folder: ``-c`` puts the working directory first on sys.path, and this
    # repository's own kernels/ folder would shadow the Hugging Face ``kernels`` package transformers looks for.
    check = subprocess.run([str(interpreter), "-c", "import disco.tuners, disco.distributions, disco.scorers"],
                           capture_output=True, text=True, cwd=env)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        hint = ("PyPI's sdist lacks disco/tuners/losses/misc: pass --disco-source with a checkout of "
                "github.com/naver/disco" if source is None else "check the checkout")
        raise SystemExit(f"vs_disco: disco from {want} does not import in {env} ({last}); {hint}")
    stamp.write_text(want)
    return interpreter


def disco_source_label(source: Path | None) -> str:
    """What was installed: PyPI's release, or the checkout's path and git commit (when it is a git checkout)."""
    if source is None:
        return DISCO_PYPI
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return f"{source} @ {commit.stdout.strip()}" if commit.returncode == 0 else str(source)


# -------------------------------------------------------------------------------------------- one run
def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children so far: the difference around
    a training subprocess is that process's CPU time, start-up included, which other jobs' load on a shared
    machine barely changes (unlike its wall-clock)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dir(out: Path, impl: str, divergence: str, lr: float, seed: int) -> Path:
    return out / f"{impl}_{divergence}_lr{lr:g}_s{seed}"


def save_steps(steps: int, eval_points: int) -> list[int]:
    """The steps at which each side saves its policy for evaluation: ``eval_points`` evenly spaced, ending
    at ``steps``."""
    if eval_points < 1 or steps % eval_points:
        raise ValueError(f"--steps {steps} is not a multiple of --eval-points {eval_points}")
    return [steps // eval_points * (i + 1) for i in range(eval_points)]


def _eval_point(step: int, batch: int, ev: dict) -> dict:
    pol = ev["policy"]
    return {"step": step, "samples": step * batch, "kl_p_pi": pol["kl_p_pi"], "kl_p_pi_se": pol["kl_p_pi_se"],
            "alignment": pol["alignment"], "kl_gain_rs": ev.get("kl_gain_rs"), "kl_gain_rs_se": ev.get("kl_gain_rs_se")}


def _base_point(ev: dict) -> dict:
    base = ev["base"]
    return {"step": 0, "samples": 0, "kl_p_pi": base["kl_p_pi"], "kl_p_pi_se": base["kl_p_pi_se"],
            "alignment": base["alignment"], "kl_gain_rs": 0.0, "kl_gain_rs_se": 0.0}


def train_fdpg(args, divergence: str, lr: float, seed: int, directory: Path) -> dict:
    """Train with ``fdpg-scale train`` (one process, one rank) and evaluate its saved checkpoints."""
    from fdpg_scale.apps.evaluate import evaluate_run
    from fdpg_scale.experiments.runner import train_run

    steps = save_steps(args.steps, args.eval_points)
    start, cpu = time.perf_counter(), children_cpu_seconds()
    train_run(args.config, directory, divergence, nproc=1,
              overrides=[f"train.lr={lr}", f"train.global_batch={args.batch}", f"train.steps={args.steps}",
                         f"seed={seed}", f"train.save_every={steps[0]}", f"train.keep_checkpoints={len(steps)}",
                         *args.overrides])
    process_seconds, process_cpu_seconds = time.perf_counter() - start, children_cpu_seconds() - cpu
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checkpoints = {int(p.name.split("_")[1]): p for p in (directory / "checkpoints").glob("step_*")}
    curve = []
    for step in steps:
        ev = evaluate_run(directory, n=args.eval_samples, n_base=args.base_samples, checkpoint=checkpoints[step])
        curve += [_base_point(ev)] if not curve else []
        curve.append(_eval_point(step, args.batch, ev))
    return {"tokens": sum(r["tokens"] for r in records), "train_seconds": sum(r["time/step"] for r in records),
            "process_seconds": process_seconds, "process_cpu_seconds": process_cpu_seconds,
            "proposal_updates": sum(r["proposal_replaced"] for r in records),
            "curve": curve}


def train_disco(args, divergence: str, lr: float, seed: int, directory: Path) -> dict:
    """Train with disco's tuner in its own environment (``_disco_worker.py``) and evaluate its saved policies."""
    from fdpg_scale.apps.evaluate import evaluate_model
    from fdpg_scale.models.hub import local_dir
    from fdpg_scale.training.config import load_config

    cfg = load_config(args.config, [f"seed={seed}", f"divergence.name={divergence}", f"train.lr={lr}",
                                    f"train.global_batch={args.batch}", *args.overrides])
    if cfg.target.kind != "pointwise" or cfg.target.scorer != "contains":
        raise SystemExit(f"vs_disco: {args.config}'s target is not a pointwise 'contains' constraint (the one the "
                         f"disco side rebuilds), got {cfg.target.kind}/{cfg.target.scorer}")
    steps = save_steps(args.steps, args.eval_points)
    interval = max(1, cfg.train.proposal_min_samples // args.batch)
    cmd = [str(args.disco_python), str(WORKER), "--model", str(local_dir(cfg.model.path, where="model.path")),
           "--divergence", divergence, "--substring", cfg.target.scorer_args["substring"], "--lr", str(lr),
           "--steps", str(args.steps), "--batch", str(args.batch), "--micro-batch", str(cfg.train.micro_batch),
           "--warmup", str(cfg.train.warmup_steps), "--proposal-interval", str(interval),
           "--window", str(interval * args.batch), "--max-new-tokens", str(cfg.sampling.max_new_tokens),
           "--seed", str(seed), "--threads", str(args.threads), "--save-steps", *map(str, steps),
           "--out", str(directory)]
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / f"{directory.name}.log"
    start, cpu = time.perf_counter(), children_cpu_seconds()
    with open(log, "w") as fh:   # TQDM_DISABLE: no progress bars of disco's in the log
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, TQDM_DISABLE="1")).returncode
    process_seconds, process_cpu_seconds = time.perf_counter() - start, children_cpu_seconds() - cpu
    if code != 0:
        raise RuntimeError(f"disco's run {directory.name} failed (exit {code}); see {log}")
    worker = json.loads((directory / "disco.json").read_text())
    curve = []
    for step in steps:
        ev = evaluate_model(cfg, directory / f"step_{step}", n=args.eval_samples, n_base=args.base_samples)
        curve += [_base_point(ev)] if not curve else []
        curve.append(_eval_point(step, args.batch, ev))
    return {"tokens": worker["tokens"], "train_seconds": worker["train_seconds"],
            "process_seconds": process_seconds, "process_cpu_seconds": process_cpu_seconds,
            "proposal_updates": worker["proposal_updates"],
            "disco_version": worker["disco_version"], "curve": curve}


def run_one(args, impl: str, divergence: str, lr: float, seed: int) -> dict:
    """Train and evaluate one side of one cell (or read its ``run.json``); returns its record."""
    directory = run_dir(args.out, impl, divergence, lr, seed)
    done = directory / "run.json"
    if not done.is_file():
        train = train_fdpg if impl == "fdpg-scale" else train_disco
        result = train(args, divergence, lr, seed, directory)
        record = {"impl": impl, "divergence": divergence, "lr": lr, "seed": seed, "steps": args.steps,
                  "batch": args.batch, **result, "tokens_per_s": result["tokens"] / result["train_seconds"],
                  "tokens_per_cpu_s": result["tokens"] / result["process_cpu_seconds"]}
        done.write_text(json.dumps(record, indent=1))
        final = record["curve"][-1]
        print(f"[vs_disco] {impl} {divergence} lr {lr:g} seed {seed}: KL(p‖π) {final['kl_p_pi']:.3f}, alignment "
              f"{final['alignment']:.3f}, {record['tokens_per_s']:.0f} tokens/s in the loop, "
              f"{record['tokens_per_cpu_s']:.0f} tokens per CPU second of the process ({record['process_seconds']:.0f} s "
              f"process)", flush=True)
    return json.loads(done.read_text())


# ------------------------------------------------------------------------------------------- summary
def _mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (nan with one value)."""
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def summarise(records: list[dict]) -> list[dict]:
    """One row per (divergence, lr): each side's final figures (mean ± SE over seeds) and the per-seed paired
    difference of final KL(p‖π), fdpg-scale − disco, with the verdicts: "no worse" when that difference's
    mean is at most one SE above 0 (None, undecided, with fewer than 2 paired seeds), "faster" when
    fdpg-scale's mean tokens/s and tokens per CPU second are both higher.

    Seeds present on one side only are left out of the paired difference."""
    rows = []
    key = lambda r: (r["divergence"], r["lr"])  # noqa: E731
    for (divergence, lr), group in itertools.groupby(sorted(records, key=key), key=key):
        group = list(group)
        sides = {impl: {r["seed"]: r for r in group if r["impl"] == impl} for impl in IMPLS}
        row = {"divergence": divergence, "lr": lr, "base_kl_p_pi": None}
        for impl, by_seed in sides.items():
            if not by_seed:
                continue
            finals = [r["curve"][-1] for r in by_seed.values()]
            row[impl] = {"seeds": len(by_seed),
                         "kl_p_pi": _mean_se([f["kl_p_pi"] for f in finals]),
                         "alignment": _mean_se([f["alignment"] for f in finals]),
                         "kl_gain_rs": _mean_se([f["kl_gain_rs"] for f in finals if f["kl_gain_rs"] is not None]),
                         "tokens_per_s": _mean_se([r["tokens_per_s"] for r in by_seed.values()]),
                         "tokens_per_cpu_s": _mean_se([r["tokens_per_cpu_s"] for r in by_seed.values()]),
                         "process_seconds": _mean_se([r["process_seconds"] for r in by_seed.values()])}
            row["base_kl_p_pi"] = statistics.fmean(r["curve"][0]["kl_p_pi"] for r in by_seed.values())
        paired = sorted(set(sides["fdpg-scale"]) & set(sides["disco"]))
        if paired:
            diff = [sides["fdpg-scale"][s]["curve"][-1]["kl_p_pi"] - sides["disco"][s]["curve"][-1]["kl_p_pi"]
                    for s in paired]
            mean, se = _mean_se(diff)
            speed = row["fdpg-scale"]["tokens_per_s"][0] / row["disco"]["tokens_per_s"][0]
            cpu_speed = row["fdpg-scale"]["tokens_per_cpu_s"][0] / row["disco"]["tokens_per_cpu_s"][0]
            row["paired"] = {"seeds": paired, "kl_diff": (mean, se), "no_worse": None if len(paired) < 2 else bool(mean <= se),
                             "speedup": speed, "cpu_speedup": cpu_speed, "faster": speed > 1 and cpu_speed > 1}
        rows.append(row)
    return rows


def _pm(pair: tuple[float, float], digits: int = 3) -> str:
    mean, se = pair
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The results table: one line per (divergence, lr, side), then the paired verdict line."""
    lines = ["| divergence | lr | implementation | seeds | KL(p‖π) final | KL(p‖a) − KL(p‖π), rejection-sampled | "
             "alignment | tokens/s (loop) | tokens per CPU s (process) | process s | fdpg − disco, KL(p‖π) (paired) | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for impl in IMPLS:
            if impl not in row:
                continue
            s = row[impl]
            verdict, diff = "", ""
            if impl == "fdpg-scale" and "paired" in row:
                p = row["paired"]
                diff = _pm(p["kl_diff"])
                closeness = {None: "undecided (one paired seed: no SE)", True: "no worse than disco beyond 1 SE",
                             False: "WORSE than disco beyond 1 SE"}[p["no_worse"]]
                verdict = (f"{closeness}; "
                           f"{p['speedup']:.2f}× disco's tokens/s, {p['cpu_speedup']:.2f}× per CPU s")
            lines.append(f"| {row['divergence']} | {row['lr']:g} | {impl} | {s['seeds']} | {_pm(s['kl_p_pi'])} | "
                         f"{_pm(s['kl_gain_rs'])} | {_pm(s['alignment'])} | {_pm(s['tokens_per_s'], 0)} | "
                         f"{_pm(s['tokens_per_cpu_s'], 0)} | "
                         f"{_pm(s['process_seconds'], 0)} | {diff} | {verdict} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """KL(p‖π) and alignment against samples seen: mean over seeds per (side, divergence, lr), bars = SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_al) = plt.subplots(1, 2, figsize=(11, 4.2))
    key = lambda r: (r["divergence"], r["lr"], r["impl"])  # noqa: E731
    for (divergence, lr, impl), group in itertools.groupby(sorted(records, key=key), key=key):
        curves = [r["curve"] for r in group]
        samples = [p["samples"] for p in curves[0]]
        style = {"linestyle": "-" if impl == "fdpg-scale" else "--", "marker": "o" if impl == "fdpg-scale" else "s"}
        for ax, metric in ((ax_kl, "kl_p_pi"), (ax_al, "alignment")):
            stats = [_mean_se([c[i][metric] for c in curves]) for i in range(len(samples))]
            ax.errorbar(samples, [m for m, _ in stats], yerr=[0 if math.isnan(se) else se for _, se in stats],
                        capsize=3, label=f"{impl}, {divergence}, lr {lr:g}", **style)
    ax_kl.set_ylabel("KL(p‖π) (nats; 2048 base draws)")
    ax_al.set_ylabel("alignment E_π[b]")
    for ax in (ax_kl, ax_al):
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
    ax_al.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--divergences", nargs="+", default=["kl", "js"], choices=["kl", "js", "tv"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--eval-points", type=int, default=2, help="evaluations per run, evenly spaced")
    ap.add_argument("--eval-samples", type=int, default=256, help="policy draws per evaluation")
    ap.add_argument("--base-samples", type=int, default=2048, help="base draws behind KL(p‖π) per evaluation")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each training process")
    ap.add_argument("--disco-source", type=Path, help="a local checkout of github.com/naver/disco to install")
    ap.add_argument("--disco-python", default=sys.executable,
                    help="the interpreter disco's environment is built with (default: this one)")
    ap.add_argument("--disco-env", type=Path, default=ROOT / ".cache" / "bench-envs" / "disco")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "vs_disco")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: table, JSON and figure from the finished runs (run.json) in --out")
    ap.add_argument("overrides", nargs="*", help="key=value for both sides' config (fdpg-scale trains with them; "
                                                  "the disco side reads model, target, sampling and train from it)")
    args = ap.parse_args(argv)
    try:
        save_steps(args.steps, args.eval_points)
    except ValueError as err:
        ap.error(str(err))
    if args.batch < 1 or args.threads < 1:
        ap.error("--batch and --threads must be >= 1")
    if args.disco_source is not None and not (args.disco_source / "disco" / "__init__.py").is_file():
        ap.error(f"--disco-source {args.disco_source} has no disco/__init__.py: give a checkout of naver/disco")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # the fdpg-scale training processes inherit it
    args.disco_source_label = None
    if args.report_only:
        return report(args)
    if "disco" in args.impls:
        args.disco_python = ensure_disco(args.disco_env, args.disco_python, args.disco_source)
        args.disco_source_label = disco_source_label(args.disco_source)
    args.out.mkdir(parents=True, exist_ok=True)
    # Both sides of a cell run back to back, so that load on a shared machine falls on both alike.
    records = [run_one(args, impl, divergence, lr, seed)
               for divergence, lr, seed, impl in itertools.product(args.divergences, args.lrs, args.seeds, args.impls)]
    return write_outputs(args, records)


def report(args) -> int:
    """``--report-only``: the outputs from the finished runs among the requested ones; names the missing."""
    cells = itertools.product(args.impls, args.divergences, args.lrs, args.seeds)
    found = {cell: run_dir(args.out, *cell) / "run.json" for cell in cells}
    missing = [path.parent.name for path in found.values() if not path.is_file()]
    records = [json.loads(path.read_text()) for path in found.values() if path.is_file()]
    if not records:
        raise SystemExit(f"vs_disco: no finished run in {args.out}")
    if missing:
        print(f"[vs_disco] not finished, left out: {', '.join(missing)}", flush=True)
    args.disco_source_label = None if args.disco_source is None else disco_source_label(args.disco_source)
    return write_outputs(args, records)


def write_outputs(args, records: list[dict]) -> int:
    """Table on stdout, ``OUT/vs_disco.json`` and ``OUT/vs_disco.png``."""
    rows = summarise(records)
    (args.out / "vs_disco.json").write_text(json.dumps({"records": records, "rows": rows, "command": " ".join(sys.argv),
                                                        "disco_source": args.disco_source_label}, indent=1))
    plot(records, args.out / "vs_disco.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
