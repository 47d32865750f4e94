"""``fdpg-scale reproduce``: the paper's findings (Go et al., ICML 2023) at small scale, with seeds and intervals.

The paper's claims, tested here on bases the project pretrains itself (nothing is downloaded):

1. no divergence is best everywhere: each makes a different trade between alignment and diversity;
2. Jensen–Shannon strikes a good balance and often beats forward KL by a wide margin;
3. these differences persist as the model grows.

What runs (a *grid*: every (task, size) cell × divergence × seed is one f-DPG run):

1. bases: the stdlib GPT-2 of ``pretrain-base`` at each size of the grid (cached; the middle size is the
   demo's own base), with held-out perplexity against the unigram (``pretrain_report.json``);
2. prompts: the conditional task's contexts, function signatures from the held-out documents;
3. runs: ``fdpg-scale train`` in its own process (``apps.sweep.train_run``), checkpoints every
   ``steps / eval_points`` steps, each checkpoint evaluated by ``apps.evaluate.evaluate_run`` (alignment,
   KL(p‖π), KL(π‖a), Distinct-1/2, Self-BLEU-3 by plain Monte Carlo): the last is the run's result, the
   others its curve against training samples; a run with its ``cell.json`` is not redone;
4. report: ``OUT/results.json`` and ``OUT/report.md``: per (task, size) the mean ± 95% t-interval over seeds,
   the curves, whether KL(p‖π) still moved over the last checkpoint interval (beyond the final interval's
   half-width), the alignment–diversity frontier (``apps.report.plot_alignment_vs_diversity`` on the
   means) and a verdict per claim.

Sizing of the full grid (the issue's budget: ≤ 2 h on 2 CPU cores, pretraining included). Bases: GPT-2
with a 2048-token BPE, 500 pretraining steps of 32 × 128 tokens each (0.8 epoch of the stdlib): tiny
2 layers × 32 (0.095 M parameters), small 2 × 64 (0.24 M), middle 4 × 128 (1.07 M, the demo's base), 11.3×
from tiny to middle. Tasks: all five (pointwise common "def ", pointwise rare "return", distributional,
reward, conditional) at the middle size; pointwise common (the cheapest, with the largest support, so Z is
estimated well at every size) at all three sizes. Divergences kl, rkl, js, tv; seeds 0, 1, 2. That is
5 × 4 × 3 + 2 × 4 × 3 = 84 runs of 60 steps × 32 sequences (1,920 samples), each evaluated after 30 and 60
steps on 256 samples (the rare constraint holds on ~3.6% of the base's draws: 256 leave about 9 of them
to estimate KL(p‖π) from). The runs go two at a time, one thread each (``--workers``'s default on 2
cores). Measured cost: docs/reproduction.md (pretraining each base, and every run's seconds in
results.json).

Why these sizes and not 0.24 M / 1.07 M / 3.09 M (6 × 192): on these 2 cores the 3 M base pretrains at
2.25 s a step (19 min idle, more than 50 beside the runs) and its runs cost ~3× a middle one; with it the
grid needed about 4 hours. Why one task across sizes: a middle-size run costs ~2.5 minutes of one core; a
second task at two more sizes adds 24 runs. Why 60 steps: the demo's 30 were still moving; more would not
fit either, so the curves in the report show whether the metrics have stopped moving, and the verdicts
say so when they have not (intervals stay wide).

The quick mode (``--quick``): the tiny base, pointwise common and reward, kl/rkl/js/tv, seeds 0 and 1,
20 steps evaluated at 2 checkpoints on 64 samples: 16 runs. Measured on 2 idle cores with no base cached:
417 s, 111 of them pretraining the tiny base (a run's start-up, three models and two evaluations, is most
of its cost at this size).

Other grids (``--grid FILE``): a YAML file of ``Grid``'s fields, read by ``load_grid`` (other tasks, sizes,
seeds, budgets); the SLURM test runs a miniature of the array this way.

Verdict rules (``claim_verdicts``), on the final KL(p‖π) (lower = closer to the target p, the quantity
f-DPG drives to 0 whatever the divergence), per (task, size) cell, with 95% t-intervals over seeds.
"A beats B clearly" means A's interval lies wholly below B's (they do not overlap).

1. holds if two different divergences are each the clear winner (clearly beating every other divergence)
   in at least one cell; does not hold here if one divergence has the lowest mean in every cell and
   clearly beats every other in all of them; otherwise inconclusive.
2. JS "beats forward KL by a wide margin" in a cell when it beats kl clearly and its mean KL(p‖π) is at most
   ``WIDE_MARGIN`` (0.8) × kl's. Holds if that is so in at least half the cells and kl never clearly beats
   JS; does not hold here if kl clearly beats JS in at least half the cells, or if JS wins widely nowhere
   while kl clearly wins somewhere; otherwise inconclusive.
3. for each task run at two sizes or more, the differences "persist" when at its largest size the best
   and worst divergences (by mean) are clearly apart, and they "vanish" when they are clearly apart at the
   smallest size but not at the largest. Holds if they persist for every such task; does not hold here if
   they vanish for every such task; otherwise inconclusive (also when no task runs at two sizes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from fdpg_scale.errors import ConfigError
from fdpg_scale.models.base_config import DEFAULT_OUT, PretrainConfig
from fdpg_scale.training.config import apply_overrides, build_section, read_yaml

__all__ = ["Grid", "Run", "QUICK", "FULL", "SIZES", "load_grid", "grid_runs", "prepare", "run_cell", "t_interval",
           "summarize", "claim_verdicts", "write_results", "run_grid", "run"]

TASKS = Path("configs/reproduce")
#: The base sizes (``PretrainConfig`` beyond the defaults), smallest first; "middle" is the demo's own base
#: (the name is older than the sweep, in which it is the largest).
SIZES = {
    "tiny": PretrainConfig(n_layer=2, n_embd=32, n_head=4),
    "small": PretrainConfig(n_layer=2, n_embd=64, n_head=4),
    "middle": PretrainConfig(),
}
#: The table's metrics: key in eval.json's rows, label, whether lower is better (None: neither).
METRICS = (("alignment", "alignment E[φ]"), ("kl_p_pi", "KL(p‖π)"), ("kl_pi_a", "KL(π‖a)"),
           ("distinct_1", "Distinct-1"), ("distinct_2", "Distinct-2"), ("self_bleu_3", "Self-BLEU-3"))
#: Two-sided confidence level of the intervals over seeds.
CONFIDENCE = 0.95
#: Claim 2: JS's mean KL(p‖π) at most this fraction of forward KL's is a "wide margin".
WIDE_MARGIN = 0.8
CLAIMS = {1: "No divergence is best everywhere: each makes a different trade between alignment and diversity.",
          2: "Jensen–Shannon strikes a good balance and often beats forward KL by a wide margin.",
          3: "These differences persist as the model grows."}
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold here", "inconclusive"


@dataclass(frozen=True, kw_only=True)
class Grid:
    """What one reproduction runs: cells (task config, size) × divergences × seeds, and its budget."""

    name: str
    """``quick`` or ``full`` (or a test's name): written into the report."""
    sizes: dict[str, PretrainConfig]
    """Base size name → its pretraining config."""
    cells: tuple[tuple[Path, str], ...]
    """(task config file, size name) pairs; the task's name is the file's stem."""
    divergences: tuple[str, ...] = ("kl", "rkl", "js", "tv")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 60
    """Optimizer steps per run (``train.steps``)."""
    eval_points: int = 3
    """Checkpoints evaluated per run, evenly spaced; the last is the run's result."""
    eval_samples: int = 128
    """Sequences drawn from the policy and from the base at each evaluation."""
    overrides: tuple[str, ...] = ()
    """Further ``key=value`` for every run (tests shrink batches and lengths with it)."""
    base_root: Path = DEFAULT_OUT.parent
    """Where the bases are cached: ``<base_root>/stdlib-gpt2`` (middle) and ``stdlib-gpt2-<size>``."""
    corpus: Path | None = None
    """Pretraining and prompt corpus (default: this Python's standard library)."""
    prompts: int = 32
    """Held-out prompts of a conditional task."""

    def __post_init__(self):
        if not self.cells or not self.divergences or not self.seeds:
            raise ValueError(f"grid {self.name!r}: needs at least one cell, divergence and seed")
        for config, size in self.cells:
            if size not in self.sizes:
                raise ValueError(f"grid {self.name!r}: cell ({config}, {size}) names an unknown size "
                                 f"(known: {', '.join(self.sizes)})")
        if not 1 <= self.eval_points <= self.steps or self.steps % self.eval_points:
            raise ValueError(f"grid {self.name!r}: eval_points ({self.eval_points}) must divide steps ({self.steps})")
        if self.eval_samples < 1 or self.prompts < 1:
            raise ValueError(f"grid {self.name!r}: eval_samples ({self.eval_samples}) and prompts ({self.prompts}) "
                             f"must be >= 1")
        # A repeated divergence, seed or (task, size) would send two runs to one directory.
        for key, items in (("divergences", self.divergences), ("seeds", self.seeds),
                           ("cells", [(c.stem, s) for c, s in self.cells])):
            if len(set(items)) < len(items):
                raise ValueError(f"grid {self.name!r}: {key} repeat an entry ({list(items)})")

    def base_dir(self, size: str) -> Path:
        """The cached base of ``size`` (the middle size shares the demo's directory)."""
        return self.base_root / ("stdlib-gpt2" if size == "middle" else f"stdlib-gpt2-{size}")


def _task(name: str) -> Path:
    return TASKS / f"{name}.yaml"


FULL = Grid(name="full", sizes=SIZES,
            cells=tuple((_task(t), "middle") for t in ("pointwise-common", "pointwise-rare", "distributional",
                                                       "reward", "conditional"))
            + tuple((_task("pointwise-common"), s) for s in ("tiny", "small")),
            eval_points=2, eval_samples=256)
QUICK = Grid(name="quick", sizes={"tiny": SIZES["tiny"]},
             cells=((_task("pointwise-common"), "tiny"), (_task("reward"), "tiny")),
             seeds=(0, 1), steps=20, eval_points=2, eval_samples=64)


# ----------------------------------------------------------------------------------------- grid files
_KINDS = {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}


def _typed(value, kind: type, key: str):
    """``value`` when it is a ``kind`` (a bool is no integer here), else a ConfigError naming ``key``."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {_KINDS[kind]}, got {value!r} ({type(value).__name__})")


def _items(value, kind: type, key: str) -> tuple:
    """A YAML list whose every item is a ``kind``, as a tuple."""
    return tuple(_typed(v, kind, f"{key}[{i}]") for i, v in enumerate(_typed(value, list, key)))


def _sizes(value, key: str) -> dict[str, PretrainConfig]:
    """{size name: PretrainConfig fields} (an empty or null entry: every default, the middle size)."""
    sizes = {}
    for name, fields in _typed(value, dict, key).items():
        _typed(name, str, f"{key}: the size name {name!r}")
        sizes[name] = build_section(PretrainConfig, {} if fields is None else fields, f"{key}.{name}.")
    return sizes


def _cells(value, key: str) -> tuple[tuple[Path, str], ...]:
    """[[task config file, size name], ...], each task config an existing file."""
    cells = []
    for i, cell in enumerate(_typed(value, list, key)):
        where = f"{key}[{i}]"
        if not isinstance(cell, list) or len(cell) != 2:
            raise ConfigError(f"{where} must be a [task config file, size name] pair, got {cell!r}")
        config = Path(_typed(cell[0], str, f"{where}[0]"))
        if not config.is_file():
            raise ConfigError(f"{where}: task config not found: {config} (relative to the current directory, "
                              f"{Path.cwd()})")
        cells.append((config, _typed(cell[1], str, f"{where}[1]")))
    return tuple(cells)


def _overrides(value, key: str) -> tuple[str, ...]:
    """``key=value`` strings whose keys exist in the run config; their values are checked when each run reads
    its task config, but a misspelt key is caught here, before a SLURM array is submitted."""
    overrides = _items(value, str, key)
    try:
        apply_overrides({}, overrides)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    return overrides


def _corpus(value, key: str) -> Path | None:
    """The corpus directory, or None (null) for this Python's standard library."""
    if value is None:
        return None
    corpus = Path(_typed(value, str, key))
    if not corpus.is_dir():
        raise ConfigError(f"{key}: not a directory: {corpus}")
    return corpus


#: Grid field -> its reader from the YAML value (and the key, for the error message).
_GRID_KEYS = {
    "name": lambda v, k: _typed(v, str, k),
    "sizes": _sizes,
    "cells": _cells,
    "divergences": lambda v, k: _items(v, str, k),
    "seeds": lambda v, k: _items(v, int, k),
    "steps": lambda v, k: _typed(v, int, k),
    "eval_points": lambda v, k: _typed(v, int, k),
    "eval_samples": lambda v, k: _typed(v, int, k),
    "overrides": _overrides,
    "base_root": lambda v, k: Path(_typed(v, str, k)),
    "corpus": _corpus,
    "prompts": lambda v, k: _typed(v, int, k),
}


def load_grid(path: str | Path) -> Grid:
    """The grid of a YAML file (``fdpg-scale reproduce --grid FILE``): a mapping of ``Grid``'s fields, e.g.

        name: mine
        sizes: {tiny: {n_layer: 2, n_embd: 32, steps: 20}}      # size name: PretrainConfig fields
        cells: [[configs/reproduce/reward.yaml, tiny]]            # [task config, size name]
        divergences: [kl, js]
        seeds: [0, 1]

    name, sizes and cells are required; the other keys default as in ``Grid``. Relative paths (task
    configs, base_root, corpus) are relative to the current directory, the project root, as the task
    configs' own paths are. Raises a one-line ConfigError naming the file and the key for an unknown key or
    PretrainConfig field, a wrong type, a missing task config file or an inconsistent grid."""
    path = Path(path)
    raw = read_yaml(path, "grid")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of the grid's keys, got {type(raw).__name__}")
    fields = dataclasses.fields(Grid)
    try:
        unknown = [k for k in raw if k not in _GRID_KEYS]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} (valid: {', '.join(_GRID_KEYS)})")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise ConfigError(f"missing key {missing[0]!r}")
        return Grid(**{k: _GRID_KEYS[k](v, k) for k, v in raw.items()})
    except ValueError as err:   # ConfigError is one; Grid's own checks raise ValueError
        raise ConfigError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Run:
    """One f-DPG run of a grid: its index is its SLURM array task id."""

    config: Path
    size: str
    divergence: str
    seed: int

    @property
    def task(self) -> str:
        return self.config.stem

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.task / self.size / self.divergence / f"seed{self.seed}"


def grid_runs(grid: Grid) -> list[Run]:
    """Every run of ``grid`` in a fixed order (cell, then divergence, then seed)."""
    return [Run(config, size, d, s) for config, size in grid.cells for d in grid.divergences for s in grid.seeds]


# ------------------------------------------------------------------------------------------- running
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
    from fdpg_scale.apps.sweep import train_run
    from fdpg_scale.training.config import load_config

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


# -------------------------------------------------------------------------------------------- numbers
def t_interval(values: list[float]) -> dict:
    """Mean and the half-width of its two-sided ``CONFIDENCE`` Student-t interval over ``values`` (one per
    seed): {"mean", "half", "lo", "hi", "n"}; ``half`` is None for a single value (no spread to measure)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half": None, "lo": None, "hi": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "n": n}


def summarize(cells: list[dict]) -> dict:
    """{task: {size: {"base": {metric: interval}, "divergences": {div: {metric: interval}}}}} over seeds."""
    grouped: dict = {}
    for c in cells:
        grouped.setdefault(c["task"], {}).setdefault(c["size"], {}).setdefault(c["divergence"], []).append(c)
    summary: dict = {}
    for task, sizes in grouped.items():
        for size, divs in sizes.items():
            any_div = next(iter(divs.values()))
            summary.setdefault(task, {})[size] = {
                # One evaluation of the base (every run draws the same base samples): no interval.
                "base": {k: t_interval([any_div[0]["base"][k]]) for k, _ in METRICS},
                "divergences": {d: {k: t_interval([c["policy"][k] for c in runs]) for k, _ in METRICS}
                                for d, runs in divs.items()}}
    return summary


def _clearly_below(a: dict, b: dict) -> bool:
    """True when interval ``a`` lies wholly below interval ``b`` (no interval: never clear)."""
    return a["hi"] is not None and b["lo"] is not None and a["hi"] < b["lo"]


def _cells(summary: dict, metric: str = "kl_p_pi"):
    """((task, size), {divergence: interval of ``metric``}) for every cell."""
    for task, sizes in summary.items():
        for size, row in sizes.items():
            yield (task, size), {d: m[metric] for d, m in row["divergences"].items()}


def _claim1(summary: dict) -> dict:
    clear_winners, best, figures = {}, {}, {}
    for (task, size), kl in _cells(summary):
        winner = min(kl, key=lambda d: kl[d]["mean"])
        best[f"{task}/{size}"] = winner
        clear = all(_clearly_below(kl[winner], kl[d]) for d in kl if d != winner) and len(kl) > 1
        if clear:
            clear_winners[f"{task}/{size}"] = winner
        figures[f"{task}/{size}"] = {d: round(v["mean"], 4) for d, v in kl.items()} | {
            "best": winner, "clear": clear}
    distinct = set(clear_winners.values())
    if len(distinct) >= 2:
        verdict = HOLDS
    elif len(set(best.values())) == 1 and len(clear_winners) == len(best):
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    why = (f"divergences with a clear win somewhere: {sorted(distinct) or 'none'}; lowest mean per cell: "
           + ", ".join(f"{c} {d}" for c, d in best.items()))
    return {"verdict": verdict, "why": why, "figures": figures}


def _claim2(summary: dict) -> dict:
    wide, kl_wins, figures, n = [], [], {}, 0
    for (task, size), kl in _cells(summary):
        if "js" not in kl or "kl" not in kl:
            continue
        n += 1
        js, fkl, cell = kl["js"], kl["kl"], f"{task}/{size}"
        ratio = js["mean"] / fkl["mean"] if fkl["mean"] > 0 else math.inf
        if _clearly_below(js, fkl) and ratio <= WIDE_MARGIN:
            wide.append(cell)
        if _clearly_below(fkl, js):
            kl_wins.append(cell)
        figures[cell] = {"js": round(js["mean"], 4), "kl": round(fkl["mean"], 4), "js/kl": round(ratio, 3)}
    if n == 0:
        return {"verdict": INCONCLUSIVE, "why": "no cell trains both js and kl", "figures": figures}
    if len(wide) >= n / 2 and not kl_wins:
        verdict = HOLDS
    elif len(kl_wins) >= n / 2 or (not wide and kl_wins):
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    why = (f"JS beats forward KL clearly with KL(p‖π) ≤ {WIDE_MARGIN}× in {len(wide)}/{n} cells "
           f"({', '.join(wide) or 'none'}); forward KL clearly beats JS in {len(kl_wins)}/{n} "
           f"({', '.join(kl_wins) or 'none'})")
    return {"verdict": verdict, "why": why, "figures": figures}


def _claim3(summary: dict, size_order: list[str]) -> dict:
    persist, vanish, neither, figures = [], [], [], {}
    for task, sizes in summary.items():
        present = [s for s in size_order if s in sizes]
        if len(present) < 2:
            continue
        apart = {}
        for s in (present[0], present[-1]):
            kl = {d: m["kl_p_pi"] for d, m in sizes[s]["divergences"].items()}
            best, worst = min(kl, key=lambda d: kl[d]["mean"]), max(kl, key=lambda d: kl[d]["mean"])
            apart[s] = _clearly_below(kl[best], kl[worst])
            figures[f"{task}/{s}"] = {"best": best, "best_kl_p_pi": round(kl[best]["mean"], 4), "worst": worst,
                                      "worst_kl_p_pi": round(kl[worst]["mean"], 4), "clearly_apart": apart[s]}
        (persist if apart[present[-1]] else vanish if apart[present[0]] else neither).append(task)
    tasks = len(persist) + len(vanish) + len(neither)
    if tasks == 0:
        return {"verdict": INCONCLUSIVE, "why": "no task runs at two sizes or more", "figures": figures}
    if len(persist) == tasks:
        verdict = HOLDS
    elif len(vanish) == tasks:
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    why = (f"best and worst divergence clearly apart at the largest size for {len(persist)}/{tasks} tasks "
           f"({', '.join(persist) or 'none'}); apart at the smallest size only for {', '.join(vanish) or 'none'}; "
           f"apart at neither for {', '.join(neither) or 'none'}")
    return {"verdict": verdict, "why": why, "figures": figures}


def claim_verdicts(summary: dict, size_order: list[str]) -> list[dict]:
    """The three claims' verdicts by the module docstring's rules: [{"claim", "statement", "verdict", "why",
    "figures"}]; ``size_order``: size names from smallest to largest."""
    return [{"claim": i, "statement": CLAIMS[i], **rule}
            for i, rule in ((1, _claim1(summary)), (2, _claim2(summary)), (3, _claim3(summary, size_order)))]


# -------------------------------------------------------------------------------------------- report
def _fmt(iv: dict) -> str:
    return f"{iv['mean']:.3f}" if iv["half"] is None else f"{iv['mean']:.3f} ± {iv['half']:.3f}"


def _size_table(sizes: dict, order: list[str], bases: dict) -> str:
    """KL(p‖π) and alignment of one task per divergence (rows) and base size (columns, smallest first)."""
    names = [s for s in order if s in sizes]
    head = " | ".join(f"{s} ({bases[s]['parameters'] / 1e6:.2f} M)" for s in names)
    lines = [f"| model | {head} |", "|---|" + "---|" * len(names)]
    lines.append("| base model a: KL(p‖a) | " + " | ".join(_fmt(sizes[s]["base"]["kl_p_pi"]) for s in names) + " |")
    for d in sizes[names[0]]["divergences"]:
        row = {s: sizes[s]["divergences"][d] for s in names}
        cells = [f"{_fmt(row[s]['kl_p_pi'])} (alignment {row[s]['alignment']['mean']:.2f})" for s in names]
        lines.append(f"| f-DPG {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table(row: dict) -> str:
    head = "| model | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [head, "|---|" + "---|" * len(METRICS),
             "| base model a | " + " | ".join(_fmt(row["base"][k]) for k, _ in METRICS) + " |"]
    for d, m in row["divergences"].items():
        lines.append(f"| f-DPG {d} | " + " | ".join(_fmt(m[k]) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def _settling(cells: list[dict], row: dict) -> str:
    """One line per cell: per divergence, the change of KL(p‖π) (mean over seeds) between the last two
    evaluated checkpoints, against the final interval's half-width: a change within it has stopped moving
    as far as these seeds can tell."""
    parts = []
    for div, m in row["divergences"].items():
        runs = [c for c in cells if c["divergence"] == div and len(c["curve"]) >= 3]  # base + ≥ 2 checkpoints
        if not runs:
            continue
        change = sum(c["curve"][-1]["kl_p_pi"] - c["curve"][-2]["kl_p_pi"] for c in runs) / len(runs)
        half = m["kl_p_pi"]["half"]
        settled = "" if half is None else (" (within ±" if abs(change) <= half else " (beyond ±") + f"{half:.3f})"
        parts.append(f"{div} {change:+.3f}{settled}")
    return ("Change of KL(p‖π) over the last checkpoint interval: " + ", ".join(parts) + ".") if parts else ""


def _plot_curves(cells: list[dict], path: Path, *, title: str) -> Path:
    """KL(p‖π) and alignment against training samples: per divergence the mean over seeds, and each seed faint."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    from fdpg_scale.apps.report import FIGURE_DPI

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_div: dict[str, list[dict]] = {}
    for c in cells:
        by_div.setdefault(c["divergence"], []).append(c)
    for ax, key, label in ((axes[0], "kl_p_pi", "KL(p‖π) (lower = closer to p)"),
                           (axes[1], "alignment", "alignment E_π[φ]")):
        for div, runs in by_div.items():
            samples = [p["samples"] for p in runs[0]["curve"]]
            mean = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(samples))]
            line, = ax.plot(samples, mean, marker="o", linewidth=2, label=f"{div} (mean of {len(runs)} seeds)")
            for r in runs:
                ax.plot([p["samples"] for p in r["curve"]], [p[key] for p in r["curve"]], color=line.get_color(),
                        alpha=0.25, linewidth=1)
        ax.set_xlabel("training samples")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def _frontier(row: dict, path: Path, *, title: str) -> Path:
    """The alignment–diversity frontier of the means (error bars: the alignment's t-interval), drawn by the
    sweep report's own scatter."""
    from fdpg_scale.apps.report import plot_alignment_vs_diversity

    def point(m: dict) -> dict:
        return {k: m[k]["mean"] for k, _ in METRICS} | {"alignment_se": m["alignment"]["half"]}

    runs = [{"eval": {"base": point(row["base"]), "policy": point(m), "divergence": d}}
            for d, m in row["divergences"].items()]
    return plot_alignment_vs_diversity(runs, path, title=title)


def write_results(out: Path, grid: Grid, bases: dict, cells: list[dict], *, command: str,
                  seconds: float | None) -> Path:
    """``out/results.json`` and ``out/report.md`` (plots beside it) from finished runs; returns the report.

    seconds: the whole command's wall time, or None when the runs ran as separate jobs (a SLURM array)."""
    summary = summarize(cells)
    order = [s for s in grid.sizes if s in bases]
    verdicts = claim_verdicts(summary, order)
    results = {"grid": grid.name, "command": command, "wall_seconds": seconds, "confidence": CONFIDENCE,
               "settings": {"divergences": list(grid.divergences), "seeds": list(grid.seeds), "steps": grid.steps,
                            "eval_points": grid.eval_points, "eval_samples": grid.eval_samples,
                            "overrides": list(grid.overrides),
                            "cells": [[str(c), s] for c, s in grid.cells]},
               "bases": bases, "summary": summary, "verdicts": verdicts, "runs": cells}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    run_seconds = [c["seconds"]["train"] + c["seconds"]["eval"] for c in cells]
    wall = f"this command's wall time {seconds:.0f} s" if seconds is not None else "runs as separate jobs"
    parts = [f"# Reproduction of the f-DPG paper's claims ({grid.name} grid)", "",
             f"Command: `{command}`; {wall} ({len(cells)} runs, {sum(run_seconds) / len(run_seconds):.0f} s a run "
             f"on average). Every run: {grid.steps} steps, evaluated at {grid.eval_points} checkpoints on "
             f"{grid.eval_samples} samples; seeds {', '.join(map(str, grid.seeds))}; ± is the half-width of the "
             f"{CONFIDENCE:.0%} t-interval over seeds. Numbers: `results.json`. Rules of the verdicts: "
             f"`fdpg_scale/apps/reproduce.py`.", "",
             "## Verdicts", ""]
    for v in verdicts:
        parts += [f"**Claim {v['claim']}: {v['verdict']}.** {v['statement']} — {v['why']}.", ""]
    parts += ["## Bases: held-out perplexity", "", "| size | parameters | GPT-2 | unigram (add-one) |",
              "|---|---|---|---|"]
    parts += [f"| {s} | {bases[s]['parameters'] / 1e6:.2f} M | {bases[s]['model_ppl']:.1f} | "
              f"{bases[s]['unigram_ppl']:.1f} |" for s in order]
    parts.append("")
    for task, sizes in summary.items():
        if len(sizes) > 1:
            parts += [f"## {task} across base sizes: KL(p‖π), mean ± half-width over seeds (mean alignment)", "",
                      _size_table(sizes, order, bases), ""]
    for task, sizes in summary.items():
        for size, row in sizes.items():
            name = f"{task}-{size}"
            here = [c for c in cells if c["task"] == task and c["size"] == size]
            curves = _plot_curves(here, out / f"{name}_curves.png", title=f"{task}, {size} base")
            frontier = _frontier(row, out / f"{name}_frontier.png", title=f"{task}, {size} base")
            parts += [f"## {task}, {size} base", "", _table(row), "", _settling(here, row), "",
                      f"![curves]({curves.name})", "",
                      f"![alignment–diversity frontier]({frontier.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _load_cells(grid: Grid, out: Path) -> list[dict]:
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
    import os

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
    import os
    import subprocess
    import sys
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

    workers: 1 runs everything in this process, run after run; N > 1 runs N runs at a time, each in its own
    ``--cell`` process, which rebuilds the grid from ``grid_args`` (the CLI flags that chose it: ``[]``,
    ``["--quick"]`` or ``["--grid", FILE]``), so those are required then."""
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
        cells = _load_cells(grid, out)
    return write_results(out, grid, bases, cells, command=command, seconds=time.perf_counter() - start)


def _chosen_grid(args) -> Grid:
    """The grid of ``--grid FILE``, else of ``--quick``, else the full one (its task configs checked)."""
    if args.grid is not None:
        return load_grid(args.grid)   # checks its own task configs
    grid = QUICK if args.quick else FULL
    for config, _ in grid.cells:
        if not config.is_file():
            raise FileNotFoundError(f"reproduce: task config not found: {config} (run from the project root)")
    return grid


def run(args) -> int:
    """``fdpg-scale reproduce [--quick | --grid FILE] [--out DIR] [--workers N] [--count | --prepare | --cell I |
    --report]``
    (arguments parsed by ``fdpg_scale.apps.cli``)."""
    grid = _chosen_grid(args)
    command = "fdpg-scale " + shlex.join(args.argv)
    if args.count:
        print(len(grid_runs(grid)))
    elif args.prepare:
        prepare(grid, args.out)
    elif args.cell is not None:
        run_cell(grid, args.out, args.cell)
    elif args.report:
        bases = json.loads((args.out / "bases.json").read_text())
        cells = _load_cells(grid, args.out)
        print(f"report: {write_results(args.out, grid, bases, cells, command=command, seconds=None)}")
    else:
        grid_args = ["--grid", str(args.grid)] if args.grid is not None else ["--quick"] if args.quick else []
        workers = default_workers() if args.workers is None else args.workers
        print(f"report: {run_grid(grid, args.out, command=command, workers=workers, grid_args=grid_args)}")
    return 0
