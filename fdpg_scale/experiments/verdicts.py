"""The paper's three claims and the rules that decide them from the runs' per-seed numbers.

The rules below were written down before any grid was run under them (the recorded full grid of
docs/reproduction.md ran under older rules, of non-overlapping intervals, and was judged again under these).
Every test is two-sided at ``ALPHA`` = 0.05 on per-seed values of the final evaluation, paired by seed where
both sides hold the same seeds and Welch's otherwise (``stats.compare``: why pairing is legitimate); within a
claim, Holm's step-down correction runs over all the claim's tests (``stats.holm``), and "significant" means
a Holm-adjusted p ≤ ``ALPHA``. Every test is reported with its mean difference, the difference's 95%
t-interval, Hedges' g with its approximate interval, p and the Holm-adjusted p (each verdict's ``tests``).

1. *No divergence is best everywhere: each makes a different trade between alignment and diversity*, judged
   on the alignment–diversity plane as stated: alignment E_π[φ] (higher is better) against Distinct-2 of the
   policy's samples (higher = more diverse; the diversity measure fixed here, Self-BLEU-3 is only reported).
   Per (task, size) cell, by per-seed means: the Pareto frontier (divergences no other matches or beats on
   both axes), A = the most aligned divergence and B = the most diverse one.
   - If A ≠ B, two tests: alignment of A against B, and Distinct-2 of B against A. The cell shows a
     *significant trade* when both are significant: A is reliably more aligned, B reliably more diverse.
   - If A = B, A leads on both axes; two tests: A's alignment against the runner-up in alignment, A's
     Distinct-2 against the runner-up in Distinct-2. The cell shows *significant dominance by A* when both are
     significant.
   Holds if more than half the cells show a significant trade; does not hold here if one divergence
   significantly dominates in more than half the cells; otherwise inconclusive.
2. *Jensen–Shannon … often beats forward KL by a wide margin*: per cell with js and kl, one test of
   KL(p‖π) (lower = closer to the target p) of kl against js. JS *beats kl widely* in a cell when the test is
   significant in JS's favour and its mean KL(p‖π) is at most ``WIDE_MARGIN`` (0.8) × kl's; kl beats JS when
   the test is significant in kl's favour. Holds if JS beats kl widely in at least half the cells and kl beats
   JS in none; does not hold here if kl beats JS in at least half the cells, or JS beats kl widely nowhere
   while kl beats it somewhere; otherwise inconclusive.
3. *These differences persist as the model grows*: for each task run at two sizes or more, the gap is
   KL(p‖π) of its worst divergence minus its best, the two chosen once per task by the mean KL(p‖π) over all
   its sizes and seeds (one pair for every size, so that the slope measures the gap's change, not which pair
   is extreme at each size), per seed (paired). Two tests per task: the gap at the largest size against 0
   (one-sample t on the per-seed gaps), and the least-squares slope of the per-seed gaps against
   ln(parameters) over every size and seed, with its t-interval (n − 2 degrees of freedom). The differences
   *persist* for a task when its largest-size gap is significantly > 0 and the slope is not significantly
   < 0; they *vanish* when the slope is significantly < 0 and the largest-size gap is not significantly > 0.
   Holds if they persist for every such task; does not hold here if they vanish for every such task;
   otherwise inconclusive (also when no task runs at two sizes).

Where the data cannot decide, the verdict is "inconclusive" and its ``why`` gives the p-values.
"""

from __future__ import annotations

import math

from fdpg_scale.experiments.stats import compare, holm, slope_t

__all__ = ["CLAIMS", "WIDE_MARGIN", "ALPHA", "DIVERSITY", "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE",
           "claim_verdicts"]

#: Claim 2: JS's mean KL(p‖π) at most this fraction of forward KL's is a "wide margin".
WIDE_MARGIN = 0.8
#: Family-wise level of each claim's tests (after Holm's correction).
ALPHA = 0.05
#: Claim 1's diversity axis: the eval rows' key (higher = more diverse).
DIVERSITY = "distinct_2"
CLAIMS = {1: "No divergence is best everywhere: each makes a different trade between alignment and diversity.",
          2: "Jensen–Shannon strikes a good balance and often beats forward KL by a wide margin.",
          3: "These differences persist as the model grows."}
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold here", "inconclusive"


def _per_seed(cells: list[dict]) -> dict:
    """{(task, size): {divergence: {seed: the final evaluation's policy row}}}, in the runs' order."""
    grouped: dict = {}
    for c in cells:
        grouped.setdefault((c["task"], c["size"]), {}).setdefault(c["divergence"], {})[c["seed"]] = c["policy"]
    return grouped


def _values(runs: dict, key: str) -> dict[int, float]:
    return {seed: row[key] for seed, row in runs.items()}


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def _test(cell: str, what: str, metric: str, a: dict[int, float], b: dict[int, float]) -> dict:
    """One comparison of ``a`` against ``b`` ({seed: value}) as a row of a verdict's ``tests``."""
    return {"cell": cell, "comparison": what, "metric": metric, **compare(a, b)}


def _adjust(tests: list[dict]) -> None:
    """Holm-adjust the p-values of one claim's tests in place ("p_holm") and mark "significant"."""
    for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adjusted
        t["significant"] = adjusted is not None and adjusted <= ALPHA


def _ci(t: dict) -> str:
    return "(no interval)" if t["lo"] is None else f"[{t['lo']:+.3f}, {t['hi']:+.3f}]"


def _fmt_p(t: dict) -> str:
    if t["p"] is None:
        return "p n/a"
    return f"p {t['p']:.3g}, Holm {t['p_holm']:.3g}"


def _frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Divergences that no other matches or beats on both axes and beats on one (both axes: higher is better)."""
    def dominated(d):
        x, y = points[d]
        return any(ox >= x and oy >= y and (ox > x or oy > y) for o, (ox, oy) in points.items() if o != d)
    return [d for d in points if not dominated(d)]


def _claim1(cells: list[dict]) -> dict:
    tests, figures, kinds = [], {}, {}
    for (task, size), divs in _per_seed(cells).items():
        if len(divs) < 2:
            continue
        cell = f"{task}/{size}"
        align = {d: _values(r, "alignment") for d, r in divs.items()}
        div = {d: _values(r, DIVERSITY) for d, r in divs.items()}
        means = {d: (_mean(align[d]), _mean(div[d])) for d in divs}
        a = max(divs, key=lambda d: means[d][0])
        b = max(divs, key=lambda d: means[d][1])
        if a != b:
            kinds[cell] = ("trade", a, b)
            pair = [_test(cell, f"{a} − {b}", "alignment", align[a], align[b]),
                    _test(cell, f"{b} − {a}", DIVERSITY, div[b], div[a])]
        else:
            run_a = max((d for d in divs if d != a), key=lambda d: means[d][0])
            run_b = max((d for d in divs if d != a), key=lambda d: means[d][1])
            kinds[cell] = ("dominance", a, a)
            pair = [_test(cell, f"{a} − {run_a}", "alignment", align[a], align[run_a]),
                    _test(cell, f"{a} − {run_b}", DIVERSITY, div[a], div[run_b])]
        tests += pair
        figures[cell] = {"frontier": _frontier(means), "most_aligned": a, "most_diverse": b,
                         "means": {d: {"alignment": round(x, 4), DIVERSITY: round(y, 4)}
                                   for d, (x, y) in means.items()}}
    if not figures:
        return {"verdict": INCONCLUSIVE, "why": "no cell trains two divergences", "figures": figures, "tests": tests}
    _adjust(tests)
    trade, dominant = [], {}
    for i, (cell, (kind, a, _)) in enumerate(kinds.items()):
        both = tests[2 * i]["significant"] and tests[2 * i + 1]["significant"]
        figures[cell]["significant"] = both
        if kind == "trade" and both:
            trade.append(cell)
        elif kind == "dominance" and both:
            dominant.setdefault(a, []).append(cell)
    n = len(figures)
    top = max(dominant, key=lambda d: len(dominant[d]), default=None)
    if len(trade) > n / 2:
        verdict = HOLDS
    elif top is not None and len(dominant[top]) > n / 2:
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    per_cell = []
    for i, (cell, (kind, a, b)) in enumerate(kinds.items()):
        t_a, t_d = tests[2 * i], tests[2 * i + 1]
        label = f"{a} most aligned, {b} most diverse" if kind == "trade" else f"{a} leads on both"
        per_cell.append(f"{cell}: {label} (alignment {t_a['diff']:+.3f}, {_fmt_p(t_a)}; Distinct-2 "
                        f"{t_d['diff']:+.3f}, {_fmt_p(t_d)}; frontier {', '.join(figures[cell]['frontier'])})")
    why = (f"significant alignment–diversity trade (Holm, α = {ALPHA}) in {len(trade)}/{n} cells "
           f"({', '.join(trade) or 'none'}); significant dominance by one divergence in "
           f"{sum(map(len, dominant.values()))}/{n}; " + "; ".join(per_cell))
    return {"verdict": verdict, "why": why, "figures": figures, "tests": tests}


def _claim2(cells: list[dict]) -> dict:
    tests, figures = [], {}
    for (task, size), divs in _per_seed(cells).items():
        if "js" not in divs or "kl" not in divs:
            continue
        cell = f"{task}/{size}"
        kl, js = _values(divs["kl"], "kl_p_pi"), _values(divs["js"], "kl_p_pi")
        tests.append(_test(cell, "kl − js", "kl_p_pi", kl, js))      # > 0: JS closer to p
        ratio = _mean(js) / _mean(kl) if _mean(kl) > 0 else math.inf
        figures[cell] = {"js": round(_mean(js), 4), "kl": round(_mean(kl), 4), "js/kl": round(ratio, 3)}
    if not tests:
        return {"verdict": INCONCLUSIVE, "why": "no cell trains both js and kl", "figures": figures, "tests": tests}
    _adjust(tests)
    wide, kl_wins = [], []
    for t in tests:
        cell = t["cell"]
        if t["significant"] and t["diff"] > 0 and figures[cell]["js/kl"] <= WIDE_MARGIN:
            wide.append(cell)
        if t["significant"] and t["diff"] < 0:
            kl_wins.append(cell)
    n = len(tests)
    if len(wide) >= n / 2 and not kl_wins:
        verdict = HOLDS
    elif len(kl_wins) >= n / 2 or (not wide and kl_wins):
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    why = (f"JS beats forward KL significantly (Holm, α = {ALPHA}) with KL(p‖π) ≤ {WIDE_MARGIN}× in "
           f"{len(wide)}/{n} cells ({', '.join(wide) or 'none'}); forward KL beats JS significantly in "
           f"{len(kl_wins)}/{n} ({', '.join(kl_wins) or 'none'}); per cell KL(p‖π) kl − js: "
           + "; ".join(f"{t['cell']} {t['diff']:+.3f} {_ci(t)}, js/kl "
                       f"{figures[t['cell']]['js/kl']:.2f}, {_fmt_p(t)}" for t in tests))
    return {"verdict": verdict, "why": why, "figures": figures, "tests": tests}


def _claim3(cells: list[dict], size_order: list[str], parameters: dict[str, int]) -> dict:
    grouped = _per_seed(cells)
    tests, figures, pairs = [], {}, {}
    for task in dict.fromkeys(t for t, _ in grouped):
        sizes = [s for s in size_order if (task, s) in grouped]
        if len(sizes) < 2:
            continue
        divs = [d for d in grouped[(task, sizes[0])] if all(d in grouped[(task, s)] for s in sizes)]
        if len(divs) < 2:
            continue
        pooled = {d: [v for s in sizes for v in _values(grouped[(task, s)][d], "kl_p_pi").values()] for d in divs}
        best = min(divs, key=lambda d: sum(pooled[d]) / len(pooled[d]))
        worst = max(divs, key=lambda d: sum(pooled[d]) / len(pooled[d]))
        xs, gaps, per_size = [], [], {}
        for s in sizes:
            w, b = _values(grouped[(task, s)][worst], "kl_p_pi"), _values(grouped[(task, s)][best], "kl_p_pi")
            seeds = sorted(set(w) & set(b))
            gap = [w[k] - b[k] for k in seeds]
            per_size[s] = {"parameters": parameters[s], "gap_mean": round(sum(gap) / len(gap), 4),
                           "seeds": len(gap)}
            xs += [math.log(parameters[s])] * len(gap)
            gaps += gap
        last = sizes[-1]
        w = _values(grouped[(task, last)][worst], "kl_p_pi")
        b = _values(grouped[(task, last)][best], "kl_p_pi")
        seeds = sorted(set(w) & set(b))
        gap_test = {"cell": f"{task}/{last}", "comparison": f"{worst} − {best}", "metric": "kl_p_pi",
                    **compare({k: w[k] for k in seeds}, {k: b[k] for k in seeds})}
        if len(gaps) >= 3:
            slope = slope_t(xs, gaps)
        else:   # one seed at two sizes: a line through two points, nothing to test
            slope = {"n": len(gaps), "slope": (gaps[-1] - gaps[0]) / (xs[-1] - xs[0]), "lo": None, "hi": None,
                     "se": None, "df": None, "p": None, "intercept": None}
        slope_test = {"cell": task, "comparison": f"slope of ({worst} − {best}) per ln(parameters)",
                      "metric": "kl_p_pi", "test": "slope", "n": slope["n"], "diff": slope["slope"],
                      "lo": slope["lo"], "hi": slope["hi"], "t": None, "df": slope["df"], "p": slope["p"],
                      "g": None, "g_lo": None, "g_hi": None}
        tests += [gap_test, slope_test]
        pairs[task] = (gap_test, slope_test)
        figures[task] = {"worst": worst, "best": best, "sizes": per_size,
                         "slope": {k: round(v, 4) if isinstance(v, float) else v for k, v in slope.items()}}
    if not pairs:
        return {"verdict": INCONCLUSIVE, "why": "no task runs at two sizes or more", "figures": figures,
                "tests": tests}
    _adjust(tests)
    persist, vanish, neither = [], [], []
    for task, (gap, slope) in pairs.items():
        gap_up = gap["significant"] and gap["diff"] > 0
        slope_down = slope["significant"] and slope["diff"] < 0
        (persist if gap_up and not slope_down else vanish if slope_down and not gap_up else neither).append(task)
    n = len(pairs)
    verdict = HOLDS if len(persist) == n else DOES_NOT_HOLD if len(vanish) == n else INCONCLUSIVE
    detail = "; ".join(
        f"{task}: {gap['comparison']} at {gap['cell'].split('/')[1]} {gap['diff']:+.3f} "
        f"{_ci(gap)} nats ({_fmt_p(gap)}), slope {slope['diff']:+.3f} {_ci(slope)} nats per ln(parameters) "
        f"({_fmt_p(slope)})"
        for task, (gap, slope) in pairs.items())
    why = (f"the gap persists (significant at the largest size, not significantly shrinking; Holm, α = {ALPHA}) "
           f"for {len(persist)}/{n} tasks ({', '.join(persist) or 'none'}), vanishes for "
           f"{', '.join(vanish) or 'none'}, neither for {', '.join(neither) or 'none'}; {detail}")
    return {"verdict": verdict, "why": why, "figures": figures, "tests": tests}


def claim_verdicts(cells: list[dict], size_order: list[str], parameters: dict[str, int]) -> list[dict]:
    """The three claims' verdicts by the module docstring's rules, from finished runs (``cell.json`` rows:
    task, size, divergence, seed, policy).

    size_order: size names from smallest to largest; parameters: {size: parameter count} (claim 3's x axis).
    Returns [{"claim", "statement", "verdict", "why", "figures", "tests"}]; each test row: {"cell",
    "comparison", "metric", "test" (paired | welch | slope), "n", "diff" (or the slope), "lo", "hi", "t", "df",
    "p", "p_holm", "significant", "g", "g_lo", "g_hi"}."""
    missing = [s for s in size_order if s not in parameters]
    if missing:
        raise ValueError(f"claim_verdicts: no parameter count for sizes {missing}")
    return [{"claim": i, "statement": CLAIMS[i], **rule}
            for i, rule in ((1, _claim1(cells)), (2, _claim2(cells)), (3, _claim3(cells, size_order, parameters)))]
