"""fdpg-scale against TRL's GRPOTrainer on the same machine: seconds per optimizer step, side by side.

    python benchmarks/vs_trl.py --out benchmarks/results/vs_trl.json                 # 1 and 2 processes
    python benchmarks/vs_trl.py --scaling --steps 6 --out /tmp/vs_trl_scaling.json    # batch and model size

The same job on both sides: the demo's base model (``configs/demo.yaml``'s ``model.path``, the stdlib GPT-2),
``--batch`` sequences per optimizer step (all processes together) of at most ``--max-new-tokens`` new tokens
from the BOS token at temperature 1 (no top-k/top-p), the pointwise reward/constraint "contains ``def ``",
and the same threads: ``--threads`` in all, split evenly over the processes (OMP_NUM_THREADS).

- **TRL**: ``GRPOTrainer`` (``beta`` 0.04, so it also runs a reference-model forward; groups of 8
  completions per prompt; activation checkpointing off, as fdpg-scale's demo runs) in its own virtual environment, ``--trl-env`` (default ``.cache/bench-envs/trl``),
  made at the first run with ``python -m venv`` and ``pip install trl==1.16.*``. The environment sees this
  project's ``.venv`` packages through a ``.pth`` file, so both sides run the very same torch and
  transformers; only TRL (and what it adds) is installed there. 2 processes run under ``torchrun`` (the
  Trainer's Accelerate state reads its rank variables; gloo on the CPU).
- **fdpg-scale**: ``fdpg-scale train --config configs/demo.yaml`` (``torchrun --standalone`` for 2 processes)
  with the batch, lengths and model overridden, and each rank's share in one micro-batch and one generate
  call (``train.micro_batch`` = ``sampling.batch`` = batch / processes) as TRL's side has it.

Per run: the median (and mean) wall seconds per optimizer step over steps 3.. (start-up and the first two
steps excluded: first-touch allocations, DeepSpeed's first step), generated tokens per second (tokens of the
timed steps / their seconds), and the peak resident memory of the largest process (``ru_maxrss`` of a
wrapper that waits for the run). fdpg-scale's steps are its ``step_wall_s`` (the loop's clock around the whole
step); TRL's are the time between consecutive ``on_step_end`` callbacks. Every f-DPG step also decides whether
q ← π on the evidence so far: with ``train.proposal_min_samples: 256`` one step in 256 / batch rescores 256
sequences, which the mean shows and the median does not.

Rounds (``--rounds``) interleave the two sides (TRL, fdpg, then fdpg, TRL, ...), so both see the same load of a
shared machine; compare the ratio fdpg / TRL of one run, not absolute figures across runs.

``--scaling`` instead runs 1 process at batch 32 and 256 on the base, and at batch 32 on random-init GPT-2
shapes of about 25 M (8 layers × 512) and 85 M (12 × 768) block parameters with the base's tokenizer.
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
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_WORKER = Path(__file__).resolve().parent / "_trl_worker.py"
TRL_REQUIREMENT = "trl==1.16.*"
SKIP = 2
#: Random-init shapes of --scaling: name -> (n_layer, n_embd, n_head).
SCALING_MODELS = {"25M": (8, 512, 8), "85M": (12, 768, 12)}


def trl_python(env_dir: Path) -> Path:
    """The TRL environment's interpreter, made (venv + pip install) when missing."""
    python = env_dir / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    print(f"[vs_trl] making the TRL environment {env_dir} ({TRL_REQUIREMENT})", flush=True)
    venv.create(env_dir, with_pip=True, clear=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project_venv.pth").write_text(ours + "\n")   # the same torch / transformers as fdpg-scale
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TRL_REQUIREMENT,
                    "-c", str(REPO / "requirements" / "lock.txt")], check=True)
    return python


def _timed(cmd: list[str], *, env: dict, log: Path) -> int:
    """Run ``cmd`` through a wrapper that prints its children's peak RSS; -> peak RSS in KiB."""
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, stdout=subprocess.PIPE, stderr=f,
                              text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}): see {log}\n"
                           + log.read_text()[-3000:])
    return int(proc.stdout.strip().splitlines()[-1])


def _env(threads: int, world: int, wait_policy: str | None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, threads // world))
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launcher(python: Path | str, world: int) -> list[str]:
    if world == 1:
        return [str(python)]
    return [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def run_trl(python: Path, model: Path, *, world: int, batch: int, steps: int, max_new_tokens: int, threads: int,
            wait_policy: str | None, work: Path) -> dict:
    out = work / "trl.json"
    cmd = _launcher(python, world) + [str(TRL_WORKER), "--model", str(model), "--steps", str(steps),
                                      "--batch", str(batch), "--max-new-tokens", str(max_new_tokens),
                                      "--out", str(out), "--workdir", str(work / "trl")]
    rss = _timed(cmd, env=_env(threads, world, wait_policy), log=work / "trl.log")
    res = json.loads(out.read_text())
    return _summary(res["step_s"], res["tokens"], rss)


def run_fdpg(model: Path, *, world: int, batch: int, steps: int, max_new_tokens: int, threads: int,
             wait_policy: str | None, work: Path) -> dict:
    share = batch // world
    micro = min(share, 32)
    overrides = [f"output_dir={work / 'fdpg'}", f"model.path={model}", f"train.steps={steps}",
                 f"train.save_every={steps}", f"train.global_batch={batch}", f"train.micro_batch={micro}",
                 f"sampling.batch={share}", f"sampling.max_new_tokens={max_new_tokens}",
                 "sampling.temperature=1.0", "logging.progress_bar=false", f"logging.summary_every={steps}"]
    python = REPO / ".venv" / "bin" / "python"
    cmd = _launcher(python if python.is_file() else sys.executable, world) + [
        "-m", "fdpg_scale.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"), *overrides]
    rss = _timed(cmd, env=_env(threads, world, wait_policy), log=work / "fdpg.log")
    rows = [json.loads(line) for line in (work / "fdpg" / "metrics.jsonl").read_text().splitlines()]
    return _summary([r["step_wall_s"] for r in rows], [r["tokens"] for r in rows], rss)


def _summary(step_s: list[float], tokens: list[float], rss_kib: int) -> dict:
    if len(step_s) <= SKIP:
        raise RuntimeError(f"{len(step_s)} steps recorded: need more than the {SKIP} excluded")
    timed, toks = step_s[SKIP:], tokens[SKIP:]
    return {"step_s": step_s, "median_s": statistics.median(timed), "mean_s": statistics.fmean(timed),
            "tokens_per_s": sum(toks) / sum(timed), "peak_rss_mib": rss_kib / 1024}


def random_gpt2(base: Path, out: Path, *, n_layer: int, n_embd: int, n_head: int) -> Path:
    """A random-init GPT-2 of the given shape with ``base``'s tokenizer, special tokens and context length."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (out / "config.json").is_file():
        return out
    cfg = GPT2Config.from_pretrained(base)
    cfg.n_layer, cfg.n_embd, cfg.n_head = n_layer, n_embd, n_head
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


def compare(cases: list[dict], *, python: Path, rounds: int, steps: int, max_new_tokens: int, threads: int,
            wait_policy: str | None, scratch: Path) -> list[dict]:
    """Each case ({label, model, world, batch}) on both sides, ``rounds`` times, the sides interleaved."""
    results = []
    for case in cases:
        runs = {"trl": [], "fdpg": []}
        for r in range(rounds):
            order = ("trl", "fdpg") if r % 2 == 0 else ("fdpg", "trl")
            for side in order:
                work = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=scratch))
                kw = dict(world=case["world"], batch=case["batch"], steps=steps, max_new_tokens=max_new_tokens,
                          threads=threads, wait_policy=wait_policy, work=work)
                res = run_trl(python, case["model"], **kw) if side == "trl" else run_fdpg(case["model"], **kw)
                print(f"[vs_trl] {case['label']} world {case['world']} batch {case['batch']} round {r} {side}: "
                      f"median {res['median_s']:.3f} s/step", flush=True)
                runs[side].append(res)
        row = {"label": case["label"], "world": case["world"], "batch": case["batch"]}
        for side, rs in runs.items():
            pooled = [s for x in rs for s in x["step_s"][SKIP:]]
            row[side] = {"median_s": statistics.median(pooled), "mean_s": statistics.fmean(pooled),
                         "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                         "peak_rss_mib": max(x["peak_rss_mib"] for x in rs), "runs": rs}
        row["ratio_median"] = row["fdpg"]["median_s"] / row["trl"]["median_s"]
        row["ratio_mean"] = row["fdpg"]["mean_s"] / row["trl"]["mean_s"]
        results.append(row)
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | processes | batch | TRL s/step (median / mean) | fdpg-scale s/step (median / mean) | "
             "fdpg / TRL (median) | tokens/s TRL / fdpg | peak RSS MiB TRL / fdpg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, f = r["trl"], r["fdpg"]
        lines.append(f"| {r['label']} | {r['world']} | {r['batch']} | {t['median_s']:.3f} / {t['mean_s']:.3f} | "
                     f"{f['median_s']:.3f} / {f['mean_s']:.3f} | {r['ratio_median']:.2f} | "
                     f"{t['tokens_per_s']:.0f} / {f['tokens_per_s']:.0f} | "
                     f"{t['peak_rss_mib']:.0f} / {f['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "stdlib-gpt2",
                    help="the base (default: the demo's stdlib GPT-2; `fdpg-scale pretrain-base` makes it)")
    ap.add_argument("--worlds", default="1,2", help="process counts, comma-separated (default 1,2)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per optimizer step (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first 2 are excluded)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side and case, interleaved (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads in all, split over the processes")
    ap.add_argument("--omp-wait-policy", choices=("active", "passive"), default=None,
                    help="OMP_WAIT_POLICY of both sides (default: inherited). On a shared, loaded machine the "
                         "default spinning barriers make every 2-thread op wait for a time slice (a tiny matmul "
                         "took 7 ms instead of 0.3 ms here under load 12): passive measures the work, not the "
                         "scheduler")
    ap.add_argument("--scaling", action="store_true", help="batch 32 → 256 and model size 1M → 25M → 85M instead")
    ap.add_argument("--trl-env", type=Path, default=REPO / ".cache" / "bench-envs" / "trl")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model} is not a model directory: run `fdpg-scale pretrain-base` first")
    python = trl_python(args.trl_env)
    scratch = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    try:
        if args.scaling:
            models = {"1M (stdlib GPT-2)": args.model}
            for name, (n_layer, n_embd, n_head) in SCALING_MODELS.items():
                models[f"{name} (random init)"] = random_gpt2(args.model, REPO / ".cache" / "models" / f"vs-trl-{name}",
                                                             n_layer=n_layer, n_embd=n_embd, n_head=n_head)
            cases = [{"label": "1M (stdlib GPT-2)", "model": args.model, "world": 1, "batch": b} for b in (32, 256)]
            cases += [{"label": k, "model": v, "world": 1, "batch": 32} for k, v in models.items() if "random" in k]
        else:
            cases = [{"label": "1M (stdlib GPT-2)", "model": args.model, "world": int(w), "batch": args.batch}
                     for w in args.worlds.split(",")]
        results = compare(cases, python=python, rounds=args.rounds, steps=args.steps,
                          max_new_tokens=args.max_new_tokens, threads=args.threads,
                          wait_policy=args.omp_wait_policy, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = table(results)
    print(text)
    meta = {"command": " ".join(["python", "benchmarks/vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
            "trl": TRL_REQUIREMENT, "threads": args.threads, "steps": args.steps, "excluded_steps": SKIP,
            "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "cpu_count": os.cpu_count(),
            "omp_wait_policy": args.omp_wait_policy,
            "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
