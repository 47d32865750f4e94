"""Numbers over seeds: the mean and Student-t interval of each metric per (task, size, divergence), and when
one interval lies clearly below another."""

from __future__ import annotations

import math

__all__ = ["METRICS", "CONFIDENCE", "t_interval", "summarize", "clearly_below"]

#: The metrics summarised: key in eval.json's rows, label.
METRICS = (("alignment", "alignment E[φ]"), ("kl_p_pi", "KL(p‖π)"), ("kl_pi_a", "KL(π‖a)"),
           ("distinct_1", "Distinct-1"), ("distinct_2", "Distinct-2"), ("self_bleu_3", "Self-BLEU-3"))
#: Two-sided confidence level of the intervals over seeds.
CONFIDENCE = 0.95


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


def clearly_below(a: dict, b: dict) -> bool:
    """True when interval ``a`` lies wholly below interval ``b`` (no interval: never clear)."""
    return a["hi"] is not None and b["lo"] is not None and a["hi"] < b["lo"]
