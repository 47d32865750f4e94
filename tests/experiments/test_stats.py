"""Numbers over seeds (experiments/stats.py): the Student-t interval, the per-cell summary, the paired and
Welch t-tests against scipy's, Hedges' g, Holm's correction on a hand-computed example, the slope's test."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sp

from fdpg_scale.experiments.stats import (METRICS, compare, hedges_g, holm, paired_t, slope_t, summarize,
                                          t_interval, welch_t)
from tests.experiments.synthetic import HIGH, LOW, WIDE, synthetic_cells

A, B = [2.1, 3.4, 1.9, 2.8, 3.0], [1.2, 2.9, 1.1, 2.5, 1.7]


def test_t_interval_matches_student_t():
    iv = t_interval([1.0, 2.0, 3.0])                       # sd 1, n 3: t(0.975, 2) = 4.3027
    assert iv["mean"] == 2.0 and math.isclose(iv["half"], 4.302652729749462 / math.sqrt(3), rel_tol=1e-9)
    assert iv["lo"] < 2.0 < iv["hi"] and iv["n"] == 3
    assert t_interval([5.0])["half"] is None                # one seed: no interval


def test_summary_groups_runs_by_task_size_and_divergence():
    cells = synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "large"): {"kl": WIDE}})
    summary = summarize(cells)
    assert set(summary) == {"a", "b"} and set(summary["a"]) == {"small"} and set(summary["b"]) == {"large"}
    row = summary["a"]["small"]
    assert set(row["divergences"]) == {"kl", "js"} and set(row["base"]) == {k for k, _ in METRICS}
    js = row["divergences"]["js"]["kl_p_pi"]
    assert math.isclose(js["mean"], 3.0) and js["n"] == 3
    assert row["base"]["kl_p_pi"]["half"] is None                            # the base: one evaluation


def test_paired_t_matches_scipy_ttest_rel_and_its_interval():
    res = sp.ttest_rel(A, B)
    ci = res.confidence_interval(0.95)
    out = paired_t(A, B)
    assert out["test"] == "paired" and out["n"] == 5 and out["df"] == 4
    assert math.isclose(out["t"], res.statistic, rel_tol=1e-12) and math.isclose(out["p"], res.pvalue, rel_tol=1e-12)
    assert math.isclose(out["diff"], 0.76, rel_tol=1e-12)   # (0.9 + 0.5 + 0.8 + 0.3 + 1.3) / 5
    assert math.isclose(out["lo"], ci.low, rel_tol=1e-9) and math.isclose(out["hi"], ci.high, rel_tol=1e-9)


def test_welch_t_matches_scipy_ttest_ind_unequal_variances():
    a, b = A, [1.2, 2.9, 1.1, 2.5]                                            # unequal sizes, unequal spreads
    res = sp.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    out = welch_t(a, b)
    assert out["test"] == "welch" and out["n"] == 4 and math.isclose(out["df"], res.df, rel_tol=1e-12)
    assert math.isclose(out["t"], res.statistic, rel_tol=1e-12) and math.isclose(out["p"], res.pvalue, rel_tol=1e-12)
    assert math.isclose(out["lo"], ci.low, rel_tol=1e-9) and math.isclose(out["hi"], ci.high, rel_tol=1e-9)


def test_hedges_g_by_hand():
    # pooled sd 1, Cohen's d = -3, J = 1 - 3 / (4 * 6 - 9) = 0.8: g = -2.4;
    # se = sqrt(6 / 9 + 2.4² / 12) = sqrt(1.14667), interval g ± 1.95996 se
    g = hedges_g([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert math.isclose(g["g"], -2.4, rel_tol=1e-12)
    half = sp.norm.ppf(0.975) * math.sqrt(6 / 9 + 2.4 ** 2 / 12)
    assert math.isclose(g["lo"], -2.4 - half, rel_tol=1e-12) and math.isclose(g["hi"], -2.4 + half, rel_tol=1e-12)
    assert hedges_g([1.0, 1.0], [2.0, 2.0])["g"] is None                     # no spread: no standardised size


def test_holm_step_down_by_hand():
    # sorted: 0.005 × 4 = 0.02, 0.01 × 3 = 0.03, 0.03 × 2 = 0.06, 0.04 × 1 = 0.04 → max(0.06, 0.04) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert [round(p, 12) for p in adjusted] == [0.03, 0.06, 0.06, 0.02]
    assert holm([0.5, 0.6]) == [1.0, 1.0]                                   # capped at 1
    # A test that could not be computed counts in m (as p = 1) and stays None.
    assert holm([0.01, None]) == [0.02, None]
    assert holm([]) == []


def test_compare_pairs_by_seed_only_when_the_seeds_match():
    a, b = dict(enumerate(A)), dict(enumerate(B))
    assert compare(a, b) == paired_t(A, B)
    b_shuffled = {s: b[s] for s in (4, 2, 0, 1, 3)}                          # order of the dict does not matter
    assert compare(a, b_shuffled)["p"] == paired_t(A, B)["p"]
    b_other = {s + 10: v for s, v in b.items()}                              # other seeds: nothing pairs them
    assert compare(a, b_other) == welch_t(A, B)


def test_no_spread_gives_no_p_value():
    out = paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])                         # every difference exactly 1
    assert out["diff"] == 1.0 and out["p"] is None and out["lo"] == out["hi"] == 1.0


def test_slope_matches_linregress_and_a_hand_computed_slope():
    x, y = [0.0, 1.0, 2.0, 3.0], [1.0, 2.1, 2.9, 4.2]                          # Sxy = 5.2, Sxx = 5: slope 1.04
    out = slope_t(x, y)
    res = sp.linregress(x, y)
    assert math.isclose(out["slope"], 1.04, rel_tol=1e-12) and math.isclose(out["p"], res.pvalue, rel_tol=1e-12)
    half = sp.t.ppf(0.975, 2) * res.stderr
    assert math.isclose(out["lo"], 1.04 - half, rel_tol=1e-12) and out["df"] == 2 and out["n"] == 4


@pytest.mark.parametrize("call, message", [
    (lambda: paired_t([1.0], [2.0]), "paired_t a: a t-test needs at least 2 values, got 1"),
    (lambda: paired_t([1.0, 2.0], [1.0, 2.0, 3.0]), "paired_t: a and b must pair up, got 2 and 3 values"),
    (lambda: welch_t([1.0, float("nan")], [1.0, 2.0]), "welch_t a: values must be finite"),
    (lambda: slope_t([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), "slope_t: needs >= 3 (x, y) points at >= 2 distinct x"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message)
