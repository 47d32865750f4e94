"""The claims' rules (experiments/verdicts.py) on synthetic numbers whose verdict is known by construction."""

from __future__ import annotations

from fdpg_scale.experiments.stats import summarize
from fdpg_scale.experiments.verdicts import CLAIMS, DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, claim_verdicts
from tests.experiments.synthetic import HIGH, LOW, WIDE, synthetic_cells


def _verdict(spec: dict, claim: int, sizes=("small", "large")) -> str:
    return claim_verdicts(summarize(synthetic_cells(spec)), list(sizes))[claim - 1]["verdict"]


def test_claim1_verdicts():
    two_winners = {("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "small"): {"kl": HIGH, "js": LOW}}
    assert _verdict(two_winners, 1) == HOLDS
    one_winner = {("a", "small"): {"kl": LOW, "js": HIGH}, ("b", "small"): {"kl": LOW, "js": HIGH}}
    assert _verdict(one_winner, 1) == DOES_NOT_HOLD
    overlapping = {("a", "small"): {"kl": WIDE, "js": [1.5, 2.5, 3.5]}, ("b", "small"): {"kl": LOW, "js": HIGH}}
    assert _verdict(overlapping, 1) == INCONCLUSIVE


def test_claim2_verdicts():
    assert _verdict({("a", "small"): {"kl": HIGH, "js": LOW}}, 2) == HOLDS                 # js/kl = 1/3, clear
    narrow = {("a", "small"): {"kl": [2.0, 2.01, 1.99], "js": [1.8, 1.81, 1.79]}}          # clear, but js/kl = 0.9
    assert _verdict(narrow, 2) == INCONCLUSIVE
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 2) == DOES_NOT_HOLD
    assert _verdict({("a", "small"): {"kl": WIDE, "rkl": LOW}}, 2) == INCONCLUSIVE         # no js: nothing to compare


def test_claim3_verdicts():
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 3) == INCONCLUSIVE          # one size only
    persists = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": HIGH, "js": LOW}}
    assert _verdict(persists, 3) == HOLDS
    vanishes = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": WIDE, "js": [1.5, 2.5, 3.5]}}
    assert _verdict(vanishes, 3) == DOES_NOT_HOLD
    # The size order decides which end is "largest": reversed, the same numbers say the differences appear.
    assert _verdict(vanishes, 3, sizes=("large", "small")) == HOLDS


def test_every_verdict_names_its_claim_and_its_figures():
    spec = {("a", "small"): {"kl": HIGH, "js": LOW}, ("a", "large"): {"kl": HIGH, "js": LOW}}
    verdicts = claim_verdicts(summarize(synthetic_cells(spec)), ["small", "large"])
    assert [v["claim"] for v in verdicts] == [1, 2, 3]
    for v in verdicts:
        assert v["statement"] == CLAIMS[v["claim"]] and v["why"] and v["figures"]
    assert verdicts[1]["figures"]["a/small"] == {"js": 1.0, "kl": 3.0, "js/kl": 0.333}
