"""Intervals over seeds (experiments/stats.py): the Student-t interval, the per-cell summary, "clearly below"."""

from __future__ import annotations

import math

from fdpg_scale.experiments.stats import METRICS, clearly_below, summarize, t_interval
from tests.experiments.synthetic import HIGH, LOW, WIDE, synthetic_cells


def test_t_interval_matches_student_t():
    iv = t_interval([1.0, 2.0, 3.0])                       # sd 1, n 3: t(0.975, 2) = 4.3027
    assert iv["mean"] == 2.0 and math.isclose(iv["half"], 4.302652729749462 / math.sqrt(3), rel_tol=1e-9)
    assert iv["lo"] < 2.0 < iv["hi"] and iv["n"] == 3
    assert t_interval([5.0])["half"] is None                # one seed: no interval, never "clearly" anything


def test_clearly_below_needs_disjoint_intervals():
    low, high, wide = t_interval(LOW), t_interval(HIGH), t_interval(WIDE)
    assert clearly_below(low, high) and not clearly_below(high, low)
    assert not clearly_below(low, wide) and not clearly_below(wide, high)     # overlapping: not clear
    assert not clearly_below(t_interval([0.0]), high)                        # one seed: never clear


def test_summary_groups_runs_by_task_size_and_divergence():
    cells = synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "large"): {"kl": WIDE}})
    summary = summarize(cells)
    assert set(summary) == {"a", "b"} and set(summary["a"]) == {"small"} and set(summary["b"]) == {"large"}
    row = summary["a"]["small"]
    assert set(row["divergences"]) == {"kl", "js"} and set(row["base"]) == {k for k, _ in METRICS}
    js = row["divergences"]["js"]["kl_p_pi"]
    assert math.isclose(js["mean"], 3.0) and js["n"] == 3
    assert row["base"]["kl_p_pi"]["half"] is None                            # the base: one evaluation
