"""Running a grid: the bases and prompts (``prepare``), one run trained and evaluated (``run_cell``: a worker
process's or a SLURM array task's job), several at a time in worker processes (``run_grid``), and the sweep's
(config, divergence) pairs (``run_sweep``). Every run trains in its own ``fdpg-scale train`` process
(``train_run``), exactly as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fdpg_scale.errors import ConfigError
from fdpg_scale.experiments.grid import Grid, grid_runs
from fdpg_scale.experiments.report import write_results
from fdpg_scale.training.config import load_config

__all__ = ["prepare", "run_cell", "load_cells", "run_grid", "default_workers", "usable_cores", "train_run",
           "run_sweep", "MAX_DEFAULT_WORKERS"]


def prepare(grid: Grid, out: Path) -> dict:
    """Build (or reuse) every base of the grid and the conditional prompts; writes ``out/bases.json``.

    Returns {size: {"dir", "parameters", "model_ppl", "unigram_ppl", "tokens", "config"}}."""
    from fdpg_scale.apps.pretrain import build_base_model
    from fdpg_scale.apps.prompt_corpus import signature_prompts

    out.mkdir(parents=True, exist_ok=True)
    bases = {}
    for size in dict.fromkeys(size for _, size in grid.cells):
        start = time.perf_counter()
        path, report, cached = build_base_model(grid.sizes[size], grid.base_dir(size), grid.corpus, log_every=100)
        h = report["heldout"]
        bases[size] = {"dir": str(path), "parameters": report["parameters"], "model_ppl": h["model_ppl"],
                       "unigram_ppl": h["unigram_ppl"], "tokens": h["tokens"], "config": report["config"]}
        print(f"[reproduce] base {size}: {report['parameters'] / 1e6:.2f} M parameters, held-out perplexity "
              f"{h['model_ppl']:.1f} (unigram {h['unigram_ppl']:.1f}), {'cached' if cached else 'built'} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    prompts = signature_prompts(grid.corpus, grid.prompts)
    if not prompts:
        raise ValueError(f"no function signature in the held-out documents of {grid.corpus or 'the stdlib'}")
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (out / "bases.json").write_text(json.dumps(bases, indent=1))
    return bases


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the run's complete checkpoints, in step order."""
    found = [(int(p.name.split("_")[1]), p) for p in (run_dir / "checkpoints").glob("step_*")
             if (p / "meta.json").is_file()]
    return sorted(found)


def run_cell(grid: Grid, out: Path, index: int) -> dict:
    """Train and evaluate run ``index`` of the grid (after ``prepare``); writes and returns its ``cell.json``."""
    runs = grid_runs(grid)
    if not 0 <= index < len(runs):  # before the heavy imports below
        raise ConfigError(f"--cell {index} is outside the {grid.name} grid's runs 0..{len(runs) - 1}")
    from fdpg_scale.apps.evaluate import evaluate_run

    r = runs[index]
    run_dir = r.directory(out)
    settings = {"steps": grid.steps, "eval_points": grid.eval_points, "eval_samples": grid.eval_samples,
                "overrides": list(grid.overrides)}
    if (run_dir / "cell.json").is_file():
        done = json.loads((run_dir / "cell.json").read_text())
        if done.get("settings") != settings:   # e.g. a quick run's cell in the full grid's directory
            raise ConfigError(f"{run_dir / 'cell.json'} was run with {done.get('settings')}, not this grid's "
                              f"{settings}: choose another --out")
        return done
    overrides = [f"model.path={grid.base_dir(r.size)}", f"seed={r.seed}", f"train.steps={grid.steps}",
                 f"train.save_every={grid.steps // grid.eval_points}", f"train.keep_checkpoints={grid.eval_points}",
                 *grid.overrides]
    cfg = load_config(r.config, overrides)   # checks the overrides before a process is started
    if cfg.target.prompts_file is not None:
        overrides.append(f"target.prompts_file={out / 'prompts.jsonl'}")
    start = time.perf_counter()
    train_run(r.config, run_dir, r.divergence, overrides=overrides)
    trained = time.perf_counter() - start
    checkpoints = _checkpoints(run_dir)
    curve, final = [], None
    for step, path in checkpoints:
        last = step == checkpoints[-1][0]
        ev = evaluate_run(run_dir, n=grid.eval_samples, checkpoint=None if last else path)
        if not curve:   # the base itself: the curve's point at 0 samples
            curve.append({"step": 0, "samples": 0, "alignment": ev["base"]["alignment"],
                          "kl_p_pi": ev["base"]["kl_p_pi"]})
        curve.append({"step": step, "samples": step * cfg.train.global_batch,
                      "alignment": ev["policy"]["alignment"], "kl_p_pi": ev["policy"]["kl_p_pi"]})
        final = ev
    cell = {"task": r.task, "size": r.size, "divergence": r.divergence, "seed": r.seed, "index": index,
            "settings": settings, "policy": final["policy"], "base": final["base"], "curve": curve,
            "seconds": {"train": trained, "eval": time.perf_counter() - start - trained}}
    (run_dir / "cell.json").write_text(json.dumps(cell, indent=1))
    print(f"[reproduce] run {index + 1}/{len(runs)} {r.task}/{r.size}/{r.divergence}/seed {r.seed}: "
          f"alignment {final['policy']['alignment']:.3f}, KL(p‖π) {final['policy']['kl_p_pi']:.3f} "
          f"({trained:.0f} s training, {cell['seconds']['eval']:.0f} s evaluation)", flush=True)
    return cell




def load_cells(grid: Grid, out: Path) -> list[dict]:
    """Every run's ``cell.json`` (runs finished as separate jobs, e.g. a SLURM array); FileNotFoundError names
    the runs that have none yet."""
    missing, cells = [], []
    for i, r in enumerate(grid_runs(grid)):
        f = r.directory(out) / "cell.json"
        if f.is_file():
            cells.append(json.loads(f.read_text()))
        else:
            missing.append(str(i))
    if missing:
        raise FileNotFoundError(f"{out}: runs {', '.join(missing)} of the {grid.name} grid have no cell.json yet")
    return cells


#: The default ``--workers`` is one per usable core, at most this many: each run holds its own three models,
#: DeepSpeed engines and evaluation (~1.5 GB for the middle base), and more runs than that on one machine
#: mostly contend for memory bandwidth.
MAX_DEFAULT_WORKERS = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a SLURM allocation or a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """``--workers`` when not given: one run per usable core, at most ``MAX_DEFAULT_WORKERS``."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores()))


def _run_cells_in_processes(grid: Grid, out: Path, workers: int, grid_args: list[str]) -> None:
    """Every run of ``grid`` without a ``cell.json`` as ``fdpg-scale reproduce GRID_ARGS --cell I`` processes,
    ``workers`` at a time, each with its share of the cores (``OMP_NUM_THREADS``); logs in ``out/logs``.

    Why processes of ``--cell`` and not threads: each is exactly a SLURM array task, and tiny models use one
    core poorly (Python-bound generation), so two one-thread runs finish sooner than one two-thread run.
    A failed run does not stop the others; RuntimeError names the failed runs and their logs at the end."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [i for i, r in enumerate(grid_runs(grid)) if not (r.directory(out) / "cell.json").is_file()]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, usable_cores() // workers)))

    def one(i: int) -> int:
        cmd = [sys.executable, "-m", "fdpg_scale.cli", "reproduce", *grid_args, "--out", str(out), "--cell", str(i)]
        log = logs / f"cell_{i}.log"
        with open(log, "w") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        # the run's own one-line summary (its last line), or where to look
        print(log.read_text().strip().splitlines()[-1] if code == 0 else f"[reproduce] run {i} failed (exit {code}): "
              f"see {log}", flush=True)
        return code

    with ThreadPoolExecutor(workers) as pool:
        codes = dict(zip(todo, pool.map(one, todo)))
    failed = [i for i, code in codes.items() if code]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} runs failed: {', '.join(map(str, failed))}; see "
                           f"{logs}/cell_<I>.log (rerun the same command to retry them; finished runs are kept)")


def run_grid(grid: Grid, out: Path, *, command: str, workers: int = 1, grid_args: list[str] | None = None) -> Path:
    """The whole reproduction: bases, runs, report; returns ``out/report.md``.

    workers: 1 runs the runs one after another from this process (each still trains in its own ``fdpg-scale
    train`` process); N > 1 runs N runs at a time, each in its own ``--cell`` process, which rebuilds the grid
    from ``grid_args`` (the CLI flags that chose it: ``[]``, ``["--quick"]`` or ``["--grid", FILE]``), so
    those are required then."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and grid_args is None:
        raise ValueError("run_grid: workers > 1 needs grid_args (the CLI flags that select the grid in a child)")
    start = time.perf_counter()
    bases = prepare(grid, out)
    if workers == 1:
        cells = [run_cell(grid, out, i) for i in range(len(grid_runs(grid)))]
    else:
        _run_cells_in_processes(grid, out, workers, grid_args)
        cells = load_cells(grid, out)
    return write_results(out, grid, bases, cells, command=command, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------- one training run
def _train_command(config: Path, output_dir: Path, divergence: str, nproc: int, overrides: list[str]) -> list[str]:
    name, _, alpha = divergence.partition(":")
    args = ["-m", "fdpg_scale.cli", "train", "--config", str(config), f"output_dir={output_dir}",
            f"divergence.name={name}", "logging.progress_bar=false", *overrides]
    if alpha:
        args.append(f"divergence.alpha={alpha}")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def check_sweep(configs: list[Path], divergences: list[str], *, nproc: int, eval_samples: int,
                overrides: list[str] = ()) -> None:
    """Every (config, divergence) run of a sweep as its trainer will read it, before any starts: ConfigError (one
    line naming the option, the config file or the key) for a bad value, so that a typo fails in a second and
    not after the runs before it have trained."""
    from fdpg_scale.training.config import load_config

    for option, value in (("--nproc", nproc), ("--eval-samples", eval_samples)):
        if value < 1:
            raise ConfigError(f"sweep {option} must be ≥ 1, got {value}")
    if len(set(divergences)) < len(divergences):
        raise ConfigError(f"sweep --divergences repeats an entry ({' '.join(divergences)})")
    for config in configs:
        if not config.is_file():
            raise FileNotFoundError(f"sweep: config file not found: {config}")
        for divergence in divergences:
            name, _, alpha = divergence.partition(":")  # in the order _train_command passes them
            try:
                load_config(config, [f"divergence.name={name}", *overrides,
                                     *([f"divergence.alpha={alpha}"] if alpha else [])])
            except ConfigError as err:
                raise ConfigError(f"sweep: {config} with --divergences {divergence}: {err}") from None


def train_run(config: Path, run_dir: Path, divergence: str, *, nproc: int = 1, overrides: list[str] = ()) -> None:
    """Train ``config`` with ``divergence`` into ``run_dir`` in its own processes (its log beside it, in
    ``<run_dir>.log``); a complete run is resumed and finds nothing to do. Raises RuntimeError naming the log."""
    env = dict(os.environ)
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(_train_command(config, run_dir, divergence, nproc, list(overrides)),
                              stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {config.stem} with {divergence} failed (exit {proc.returncode}); see {log}")


# ------------------------------------------------------------------------------------------- the sweep
def run_sweep(configs: list[Path], divergences: list[str], out: Path, *, nproc: int = 1, eval_samples: int = 256,
              overrides: list[str] = ()) -> Path:
    """Train + evaluate each (config, divergence), write ``out/report.md`` and return its path.

    divergences: names, ``alpha:0.5`` for an α-divergence. overrides: ``key=value`` for every run. Each pair
    is one run of the config's own seed, trained by ``train_run`` as a grid's runs are, into
    ``out/<config stem>/<divergence>``; its report is the sweep's own (``apps.report``), without intervals.
    """
    from fdpg_scale.apps.evaluate import evaluate_run
    from fdpg_scale.apps.report import load_run, results_table, write_report

    out.mkdir(parents=True, exist_ok=True)
    groups = {}
    for config in configs:
        runs = []
        for divergence in divergences:
            run_dir = out / config.stem / divergence.replace(":", "")
            start = time.perf_counter()
            train_run(config, run_dir, divergence, nproc=nproc, overrides=overrides)
            evaluate_run(run_dir, n=eval_samples)
            print(f"[sweep] {config.stem} / {divergence}: trained and evaluated in "
                  f"{time.perf_counter() - start:.0f} s ({run_dir})", flush=True)
            runs.append(load_run(run_dir))
        groups[config.stem] = runs
        print(f"\n{config.stem}\n{results_table(runs)}\n", flush=True)
    return write_report(groups, out)
