"""Tables and plots of a set of runs: alignment against diversity per divergence, divergence to the target
per step, and a Markdown report that holds both.

Input is a list of finished runs (each an ``output_dir`` with ``metrics.jsonl`` and ``eval.json``) grouped
by task; nothing here trains or samples.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_run", "alignment_keys", "results_table", "plot_alignment_vs_diversity", "running_estimate",
           "plot_divergence_per_step", "write_report"]

#: Resolution of the report's PNG plots.
FIGURE_DPI = 110
#: The table's columns after the alignment column(s).
TABLE_COLUMNS = (("kl_p_pi", "KL(p‖π)"), ("kl_pi_a", "KL(π‖a)"), ("distinct_1", "Distinct-1"),
                 ("distinct_2", "Distinct-2"), ("self_bleu_3", "Self-BLEU-3"))


def alignment_keys(row: dict) -> list[str]:
    """The alignment columns of an eval.json row: ``["alignment"]`` for a one-scorer target, else one
    ``alignment/<scorer>`` per scorer (in name order)."""
    if "alignment" in row:
        return ["alignment"]
    return sorted(k for k in row if k.startswith("alignment/"))


def _columns(row: dict) -> list[tuple[str, str]]:
    """(key, label) of every table column for runs whose rows look like ``row``."""
    align = [(k, "alignment E[φ]" if k == "alignment" else f"alignment {k.split('/', 1)[1]}")
             for k in alignment_keys(row)]
    return align + list(TABLE_COLUMNS)


def load_run(output_dir: str | Path) -> dict:
    """{"name", "eval" (eval.json), "metrics" (metrics.jsonl rows)} of one finished run."""
    output_dir = Path(output_dir)
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"name": output_dir.name, "dir": output_dir, "eval": json.loads((output_dir / "eval.json").read_text()),
            "metrics": metrics}


def results_table(runs: list[dict]) -> str:
    """A Markdown table: the base model (from the first run's evaluation) then one row per run; one alignment
    column per scorer of the target."""
    columns = _columns(runs[0]["eval"]["base"])
    head = "| model | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    rows = [_table_row("base model a", runs[0]["eval"]["base"], columns)]
    rows += [_table_row(f"f-DPG {run['eval']['divergence']}", run["eval"]["policy"], columns) for run in runs]
    return "\n".join([head, rule, *rows])


def _se_key(key: str) -> str:
    """``alignment/x`` -> ``alignment_se/x``; ``kl_p_pi`` -> ``kl_p_pi_se`` (eval.json's names)."""
    metric, _, scorer = key.partition("/")
    return f"{metric}_se/{scorer}" if scorer else f"{key}_se"


def _table_row(name: str, values: dict, columns: list[tuple[str, str]]) -> str:
    cells = []
    for key, _ in columns:
        se = values.get(_se_key(key))
        cells.append(f"{values[key]:.3f} ± {se:.3f}" if se is not None else f"{values[key]:.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def plot_alignment_vs_diversity(runs: list[dict], path: str | Path, *, title: str) -> Path:
    """Scatter of alignment (y) against Distinct-2 and against Self-BLEU-3 (x), one point per divergence (and
    per scorer, labelled ``divergence: scorer``, for a target of several scorers)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "distinct_2", "Distinct-2 (higher = more diverse)"),
                           (axes[1], "self_bleu_3", "Self-BLEU-3 (lower = more diverse)")):
        points = [("base a", runs[0]["eval"]["base"])] + [(r["eval"]["divergence"], r["eval"]["policy"]) for r in runs]
        for name, values in points:
            for a in alignment_keys(values):
                point = name if a == "alignment" else f"{name}: {a.split('/', 1)[1]}"
                ax.errorbar(values[key], values[a], yerr=values.get(_se_key(a)), fmt="o", capsize=3,
                            label=point, color="black" if name == "base a" else None)
                ax.annotate(point, (values[key], values[a]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(label)                      # the metric on this axis, never a point's name
        ax.set_ylabel("alignment E_π[φ]")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def running_estimate(values: list[float], ses: list[float | None], window: int) -> tuple[list[float], list[float]]:
    """Trailing mean of per-step estimates over ``window`` steps and its standard error, from each step's own SE
    (the steps' batches are independent draws): se = sqrt(Σ se_i²) / w. A step without an SE counts as 0 there.
    -> (means, ses), one per step."""
    means, bands = [], []
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        w = i + 1 - lo
        means.append(sum(values[lo:i + 1]) / w)
        bands.append(sum((se or 0.0) ** 2 for se in ses[lo:i + 1]) ** 0.5 / w)
    return means, bands


def plot_divergence_per_step(runs: list[dict], path: str | Path, *, title: str, window: int = 5) -> Path:
    """KL(p‖π) against the optimizer step, per divergence: the running estimate from training (each step's
    batch of q's samples, importance-sampled: a ``window``-step trailing mean with a ±1 SE band, the raw
    per-step values faint) and the evaluation points (``fdpg-scale eval``: KL(p‖a) at step 0 from the base
    draws, KL(p‖π) at the last step, each ± 1 SE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base = runs[0]["eval"]["base"]
    ax.errorbar([0], [base["kl_p_pi"]], yerr=[base.get("kl_p_pi_se") or 0.0], fmt="s", color="black", capsize=3,
                label="base a (evaluation)")
    for run in runs:
        rows = [m for m in run["metrics"] if m.get("kl_p_pi") is not None]
        steps = [m["step"] for m in rows]
        kl = [m["kl_p_pi"] for m in rows]
        smooth, band = running_estimate(kl, [m.get("kl_p_pi_se") for m in rows], window)
        name = run["eval"]["divergence"]
        line, = ax.plot(steps, smooth, linewidth=2, label=f"{name}: training, {window}-step mean ± SE")
        ax.fill_between(steps, [m - b for m, b in zip(smooth, band)], [m + b for m, b in zip(smooth, band)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        ax.plot(steps, kl, color=line.get_color(), alpha=0.25, linewidth=1)
        final = run["eval"]["policy"]
        if steps:
            ax.errorbar([steps[-1]], [final["kl_p_pi"]], yerr=[final.get("kl_p_pi_se") or 0.0], fmt="D",
                        color=line.get_color(), capsize=3, markeredgecolor="black", label=f"{name}: evaluation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(p‖π) (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def write_report(groups: dict[str, list[dict]], out_dir: str | Path, *, header: str = "") -> Path:
    """``report.md`` in ``out_dir``: per group (a task, a model size) the table and both plots."""
    out_dir = Path(out_dir)
    parts = ["# f-DPG: alignment against diversity per divergence", "", header] if header else \
        ["# f-DPG: alignment against diversity per divergence", ""]
    for group, runs in groups.items():
        scatter = plot_alignment_vs_diversity(runs, out_dir / f"{group}_alignment_vs_diversity.png", title=group)
        curve = plot_divergence_per_step(runs, out_dir / f"{group}_kl_per_step.png", title=group)
        parts += [f"## {group}", "", results_table(runs), "",
                  f"![alignment against diversity]({scatter.name})", "", f"![KL(p‖π) per step]({curve.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
