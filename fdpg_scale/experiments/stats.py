"""Numbers over seeds: the mean and Student-t interval of each metric per (task, size, divergence); tests of
one divergence against another on per-seed values (paired or Welch t), Holm's correction across the cells of
a claim, and effect sizes with their intervals. The verdicts' rules that use them: ``verdicts``.

The t distribution, and the t-tests' p-values, come from scipy (``scipy.stats.t``, ``ttest_rel``,
``ttest_ind``); nothing here evaluates a special function by hand."""

from __future__ import annotations

import math

__all__ = ["METRICS", "CONFIDENCE", "t_interval", "summarize", "compare", "paired_t",
           "welch_t", "hedges_g", "holm", "slope_t"]

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


def _check(name: str, values) -> list[float]:
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"{name}: a t-test needs at least 2 values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: values must be finite, got {values}")
    return values


def _p(value) -> float | None:
    """A p-value, or None where scipy returns NaN (no spread at all: every difference equal)."""
    value = float(value)
    return None if math.isnan(value) else value


def hedges_g(a: list[float], b: list[float]) -> dict:
    """Standardised mean difference of ``a`` over ``b`` (each one value per seed): Hedges' g, i.e. Cohen's d
    on the pooled sd, (mean a − mean b) / s_pooled, times the small-sample correction J = 1 − 3 / (4 (n_a + n_b)
    − 9); and its approximate ``CONFIDENCE`` interval g ± z · se with se² = (n_a + n_b) / (n_a n_b) +
    g² / (2 (n_a + n_b)) (Hedges & Olkin 1985, the normal approximation: rough with 3 seeds a side, which is
    why the verdicts decide on the tests and the mean difference's t-interval, and report g beside them).

    The same pooled sd for paired and unpaired comparisons, so that g means the same thing in both (for
    paired runs the test's own statistic uses the sd of the differences instead). {"g", "lo", "hi"}; all None
    where the pooled sd is 0."""
    from scipy.stats import norm

    a, b = _check("hedges_g a", a), _check("hedges_g b", b)
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    pooled = math.sqrt((sum((v - ma) ** 2 for v in a) + sum((v - mb) ** 2 for v in b)) / (na + nb - 2))
    if pooled == 0:
        return {"g": None, "lo": None, "hi": None}
    g = (ma - mb) / pooled * (1 - 3 / (4 * (na + nb) - 9))
    se = math.sqrt((na + nb) / (na * nb) + g * g / (2 * (na + nb)))
    z = float(norm.ppf(0.5 + CONFIDENCE / 2))
    return {"g": g, "lo": g - z * se, "hi": g + z * se}


def paired_t(a: list[float], b: list[float]) -> dict:
    """Paired t-test of ``a`` against ``b``, ``a[i]`` and ``b[i]`` from the same seed (scipy's ``ttest_rel``,
    two-sided), with the mean difference mean(a − b) and its ``CONFIDENCE`` t-interval (sd of the differences,
    n − 1 degrees of freedom) and Hedges' g.

    Returns {"test": "paired", "n", "diff", "lo", "hi", "t", "df", "p", "g", "g_lo", "g_hi"}; t and p are None
    when every difference is equal (no spread to test against)."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_rel

    a, b = _check("paired_t a", a), _check("paired_t b", b)
    if len(a) != len(b):
        raise ValueError(f"paired_t: a and b must pair up, got {len(a)} and {len(b)} values")
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    diff = sum(d) / n
    sd = math.sqrt(sum((v - diff) ** 2 for v in d) / (n - 1))
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    res = ttest_rel(a, b) if sd > 0 else None
    g = hedges_g(a, b)
    return {"test": "paired", "n": n, "diff": diff, "lo": diff - half, "hi": diff + half,
            "t": None if res is None else float(res.statistic), "df": n - 1,
            "p": None if res is None else _p(res.pvalue),
            "g": g["g"], "g_lo": g["lo"], "g_hi": g["hi"]}


def welch_t(a: list[float], b: list[float]) -> dict:
    """Welch's unequal-variance t-test of ``a`` against ``b`` (scipy's ``ttest_ind(equal_var=False)``,
    two-sided), with mean(a) − mean(b) and its ``CONFIDENCE`` interval on the Welch–Satterthwaite degrees of
    freedom, and Hedges' g. Same keys as ``paired_t`` ("test": "welch"; "n": the smaller sample)."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_ind

    a, b = _check("welch_t a", a), _check("welch_t b", b)
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((v - ma) ** 2 for v in a) / (na - 1) / na
    vb = sum((v - mb) ** 2 for v in b) / (nb - 1) / nb
    diff = ma - mb
    g = hedges_g(a, b)
    out = {"test": "welch", "n": min(na, nb), "diff": diff, "g": g["g"], "g_lo": g["lo"], "g_hi": g["hi"]}
    if va + vb == 0:
        return out | {"lo": diff, "hi": diff, "t": None, "df": None, "p": None}
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(va + vb)
    res = ttest_ind(a, b, equal_var=False)
    return out | {"lo": diff - half, "hi": diff + half, "t": float(res.statistic), "df": df, "p": _p(res.pvalue)}


def _mean_of(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def compare(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a`` against ``b``, each {seed: value}: the paired t-test when both hold the same seeds, else Welch's.

    Why paired where the seeds match: in a grid, runs of two divergences with the same seed start from the same
    base and the same seed (the same initial sampling stream), so part of a seed's luck is shared and the
    per-seed difference removes it; the pairing is fixed by the design, not chosen after seeing the data.
    Where the seeds differ (a run missing, another grid) nothing pairs them, and Welch's test does not assume
    equal variances (the divergences' spreads differ several-fold in the recorded grid).

    With a single value on either side there is nothing to test: the row has "test": "none", the difference
    of the means, and None for the interval, t, p and g."""
    if min(len(a), len(b)) < 2:
        return {"test": "none", "n": min(len(a), len(b)), "diff": _mean_of(a) - _mean_of(b), "lo": None, "hi": None,
                "t": None, "df": None, "p": None, "g": None, "g_lo": None, "g_hi": None}
    if set(a) == set(b):
        seeds = sorted(a)
        return paired_t([a[s] for s in seeds], [b[s] for s in seeds])
    return welch_t(list(a.values()), list(b.values()))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the order given: sort the m p-values ascending, p_(1) ≤ … ≤ p_(m);
    the i-th adjusted value is max over j ≤ i of min(1, (m − j + 1) p_(j)). Rejecting where the adjusted value
    is ≤ α keeps the family-wise error rate at α (Holm 1979). A None (a test that could not be computed) counts
    in m as a p-value of 1 and stays None."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: 1.0 if pvalues[i] is None else pvalues[i])
    adjusted: list[float | None] = [None] * m
    running = 0.0
    for rank, i in enumerate(order):
        p = 1.0 if pvalues[i] is None else pvalues[i]
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = None if pvalues[i] is None else running
    return adjusted


def slope_t(x: list[float], y: list[float]) -> dict:
    """Least-squares slope of ``y`` on ``x`` (scipy's ``linregress``), its standard error, ``CONFIDENCE``
    t-interval (n − 2 degrees of freedom) and the two-sided p-value of slope = 0.

    {"n", "slope", "lo", "hi", "se", "df", "p", "intercept"}; ValueError with fewer than 3 points or a single x."""
    from scipy.stats import linregress
    from scipy.stats import t as student_t

    x, y = _check("slope_t x", x), _check("slope_t y", y)
    if len(x) != len(y) or len(x) < 3 or len(set(x)) < 2:
        raise ValueError(f"slope_t: needs >= 3 (x, y) points at >= 2 distinct x, got {len(x)} x and {len(y)} y "
                         f"at {len(set(x))} x")
    res = linregress(x, y)
    df = len(x) - 2
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, df)) * float(res.stderr)
    return {"n": len(x), "slope": float(res.slope), "lo": float(res.slope) - half, "hi": float(res.slope) + half,
            "se": float(res.stderr), "df": df, "p": _p(res.pvalue), "intercept": float(res.intercept)}
