"""The paper's three claims and the rules that decide them from the runs' numbers, fixed before the full grid
ran.

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

import math

from fdpg_scale.experiments.stats import clearly_below

__all__ = ["CLAIMS", "WIDE_MARGIN", "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "claim_verdicts"]

#: Claim 2: JS's mean KL(p‖π) at most this fraction of forward KL's is a "wide margin".
WIDE_MARGIN = 0.8
CLAIMS = {1: "No divergence is best everywhere: each makes a different trade between alignment and diversity.",
          2: "Jensen–Shannon strikes a good balance and often beats forward KL by a wide margin.",
          3: "These differences persist as the model grows."}
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold here", "inconclusive"


def _cell_intervals(summary: dict, metric: str = "kl_p_pi"):
    """((task, size), {divergence: interval of ``metric``}) for every cell."""
    for task, sizes in summary.items():
        for size, row in sizes.items():
            yield (task, size), {d: m[metric] for d, m in row["divergences"].items()}


def _claim1(summary: dict) -> dict:
    clear_winners, best, figures = {}, {}, {}
    for (task, size), kl in _cell_intervals(summary):
        winner = min(kl, key=lambda d: kl[d]["mean"])
        best[f"{task}/{size}"] = winner
        clear = all(clearly_below(kl[winner], kl[d]) for d in kl if d != winner) and len(kl) > 1
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
    for (task, size), kl in _cell_intervals(summary):
        if "js" not in kl or "kl" not in kl:
            continue
        n += 1
        js, fkl, cell = kl["js"], kl["kl"], f"{task}/{size}"
        ratio = js["mean"] / fkl["mean"] if fkl["mean"] > 0 else math.inf
        if clearly_below(js, fkl) and ratio <= WIDE_MARGIN:
            wide.append(cell)
        if clearly_below(fkl, js):
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
            apart[s] = clearly_below(kl[best], kl[worst])
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
