"""The reproduction's report: ``results.json`` (every number) and ``report.md`` with its tables and plots; and
the claims judged again from a recorded ``results.json`` under the current rules (``rejudge``)."""

from __future__ import annotations

import json
from pathlib import Path

from fdpg_scale.errors import ConfigError
from fdpg_scale.experiments.grid import Grid
from fdpg_scale.experiments.stats import CONFIDENCE, METRICS, summarize
from fdpg_scale.experiments.verdicts import claim_verdicts

__all__ = ["write_results", "verdict_lines", "rejudge"]


def _fmt(iv: dict) -> str:
    return f"{iv['mean']:.3f}" if iv["half"] is None else f"{iv['mean']:.3f} ± {iv['half']:.3f}"


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def verdict_lines(verdicts: list[dict]) -> list[str]:
    """Markdown of the verdicts: per claim its verdict line, and a table of its tests (mean difference or
    slope with its 95% interval, Hedges' g with its approximate interval, p and Holm-adjusted p)."""
    parts = []
    for v in verdicts:
        parts += [f"**Claim {v['claim']}: {v['verdict']}.** {v['statement']} — {v['why']}.", ""]
        if not v.get("tests"):
            continue
        parts += ["| cell | comparison | metric | test | n | difference [95% CI] | Hedges' g [95% CI] | p | Holm p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in v["tests"]:
            g = "—" if t["g"] is None else f"{t['g']:+.2f} [{t['g_lo']:+.2f}, {t['g_hi']:+.2f}]"
            mark = " *" if t["significant"] else ""
            ci = "(no interval)" if t["lo"] is None else f"[{t['lo']:+.3f}, {t['hi']:+.3f}]"
            parts.append(f"| {t['cell']} | {t['comparison']} | {t['metric']} | {t['test']} | {t['n']} | "
                         f"{t['diff']:+.3f} {ci} | {g} | {_num(t['p'], '.3g')} | "
                         f"{_num(t['p_holm'], '.3g')}{mark} |")
        parts += ["", "(* significant after Holm's correction at α = 0.05.)", ""]
    return parts


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


def closeness_table(cells: list[dict]) -> str:
    """Per (task, size, divergence), in the grid's order: how many seeds end closer to p than the base, each
    seed's gain KL(p‖a) − KL(p‖π) and how many base draws with P > 0 stand behind the figures.

    The gain is paired: a run's KL(p‖a) and KL(p‖π) are importance-sampled from the same base draws (fresh
    per seed), so their difference carries less noise than either figure. A Markdown table."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["task"], c["size"], c["divergence"]), []).append(c)
    lines = ["| task | size | divergence | seeds closer to p | KL(p‖a) − KL(p‖π) per seed | least gain | "
             "P > 0 base draws per seed |", "|---|---|---|---|---|---|---|"]
    for (task, size, div), runs in groups.items():
        runs = sorted(runs, key=lambda c: c["seed"])
        gains = [c["base"]["kl_p_pi"] - c["policy"]["kl_p_pi"] for c in runs]
        draws = [c["policy"].get("kl_p_pi_draws") for c in runs]
        lines.append(f"| {task} | {size} | {div} | {sum(g > 0 for g in gains)}/{len(gains)} | "
                     + ", ".join(f"{g:+.3f}" for g in gains) + f" | {min(gains):+.3f} | "
                     + ", ".join("?" if d is None else str(d) for d in draws) + " |")
    return "\n".join(lines)


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
    verdicts = claim_verdicts(cells, order, {s: bases[s]["parameters"] for s in order})
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
             f"`fdpg_scale/experiments/verdicts.py`.", "",
             "## Verdicts", ""]
    parts += verdict_lines(verdicts)
    parts += ["## Bases: held-out perplexity", "", "| size | parameters | GPT-2 | unigram (add-one) |",
              "|---|---|---|---|"]
    parts += [f"| {s} | {bases[s]['parameters'] / 1e6:.2f} M | {bases[s]['model_ppl']:.1f} | "
              f"{bases[s]['unigram_ppl']:.1f} |" for s in order]
    parts += ["", "## Closer to p than the base, seed by seed", "",
              "The gain KL(p‖a) − KL(p‖π) of each run against the base on the same draws (> 0: the policy ended "
              "closer to p).", "", closeness_table(cells), ""]
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


def rejudge(results: Path, out: Path) -> Path:
    """The claims judged again, by the current rules of ``experiments.verdicts``, from the per-run records
    (``runs``) and the bases (``bases``: parameter counts, which order the sizes) of a recorded
    ``results.json``; nothing is trained or evaluated. Writes ``out/verdicts.json`` ({"source", "alpha",
    "verdicts"}) and ``out/verdicts.md`` (the verdicts with their tests' tables); returns the latter.

    ConfigError (one line, naming the file and the key) when ``results`` is not a reproduction's results.json."""
    from fdpg_scale.experiments.verdicts import ALPHA

    try:
        recorded = json.loads(Path(results).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{results}: not valid JSON ({err.msg} at line {err.lineno})") from None
    for key in ("runs", "bases"):
        if not isinstance(recorded, dict) or key not in recorded:
            raise ConfigError(f"{results}: no {key!r} key: not the results.json of fdpg-scale reproduce")
    bases = recorded["bases"]
    sizes = {c["size"] for c in recorded["runs"]}
    unknown = sorted(sizes - set(bases))
    if unknown:
        raise ConfigError(f"{results}: runs at sizes {unknown} have no entry under 'bases'")
    order = sorted(sizes, key=lambda s: bases[s]["parameters"])
    verdicts = claim_verdicts(recorded["runs"], order, {s: bases[s]["parameters"] for s in order})
    out.mkdir(parents=True, exist_ok=True)
    (out / "verdicts.json").write_text(json.dumps({"source": str(results), "alpha": ALPHA, "verdicts": verdicts},
                                                  indent=1))
    path = out / "verdicts.md"
    path.write_text("\n".join([f"# Verdicts of `{results}` by the rules of `fdpg_scale/experiments/verdicts.py`",
                               "", *verdict_lines(verdicts)]))
    return path
