"""The claims' rules (experiments/verdicts.py) on synthetic per-seed numbers whose verdict is known by
construction."""

from __future__ import annotations

import pytest

from fdpg_scale.experiments.verdicts import CLAIMS, DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, claim_verdicts
from tests.experiments.synthetic import HIGH, LOW, WIDE, synthetic_cells

PARAMETERS = {"small": 100_000, "large": 1_000_000}


def _verdicts(spec: dict, sizes=("small", "large")) -> list[dict]:
    return claim_verdicts(synthetic_cells(spec), list(sizes), PARAMETERS)


def _verdict(spec: dict, claim: int, sizes=("small", "large")) -> str:
    return _verdicts(spec, sizes)[claim - 1]["verdict"]


# Alignment and Distinct-2 per seed: MORE is reliably above LESS (the per-seed differences vary a little).
LESS, MORE = [0.30, 0.35, 0.32], [0.80, 0.83, 0.86]
NOISY = [0.2, 0.9, 0.5]


def test_claim1_holds_on_a_significant_trade_in_most_cells():
    trade = {"rkl": {"alignment": MORE, "distinct_2": LESS}, "kl": {"alignment": LESS, "distinct_2": MORE}}
    verdicts = _verdicts({("a", "small"): trade, ("b", "small"): trade})
    v = verdicts[0]
    assert v["verdict"] == HOLDS, v["why"]
    assert v["figures"]["a/small"]["most_aligned"] == "rkl" and v["figures"]["a/small"]["most_diverse"] == "kl"
    assert sorted(v["figures"]["a/small"]["frontier"]) == ["kl", "rkl"]
    assert [t["comparison"] for t in v["tests"][:2]] == ["rkl − kl", "kl − rkl"]
    assert all(t["significant"] and t["test"] == "paired" for t in v["tests"])


def test_claim1_does_not_hold_when_one_divergence_dominates_most_cells():
    dominated = {"js": {"alignment": MORE, "distinct_2": MORE}, "kl": {"alignment": LESS, "distinct_2": LESS}}
    v = _verdicts({("a", "small"): dominated, ("b", "small"): dominated})[0]
    assert v["verdict"] == DOES_NOT_HOLD, v["why"]
    assert v["figures"]["a/small"]["frontier"] == ["js"]


def test_claim1_is_inconclusive_when_the_trade_is_within_the_noise():
    noisy = {"rkl": {"alignment": NOISY, "distinct_2": LESS}, "kl": {"alignment": LESS, "distinct_2": NOISY}}
    v = _verdicts({("a", "small"): noisy})[0]
    assert v["verdict"] == INCONCLUSIVE and "p " in v["why"], v["why"]      # the p-values are stated


def test_claim2_verdicts():
    assert _verdict({("a", "small"): {"kl": HIGH, "js": LOW}}, 2) == HOLDS                 # js/kl = 1/3, significant
    narrow = {("a", "small"): {"kl": [2.0, 2.02, 1.99], "js": [1.8, 1.81, 1.79]}}          # significant, js/kl = 0.9
    assert _verdict(narrow, 2) == INCONCLUSIVE
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 2) == DOES_NOT_HOLD
    assert _verdict({("a", "small"): {"kl": LOW, "js": WIDE}}, 2) == INCONCLUSIVE          # within the noise
    assert _verdict({("a", "small"): {"kl": WIDE, "rkl": LOW}}, 2) == INCONCLUSIVE         # no js: nothing to compare


def test_claim2_corrects_for_the_number_of_cells():
    # p ≈ 0.03 in each of 4 cells: significant alone, not after Holm (4 × 0.03 > 0.05).
    cells = {(f"t{i}", "small"): {"kl": [2.0, 2.4, 1.8], "js": [1.0, 1.0, 1.0]} for i in range(4)}
    v = _verdicts(cells)[1]
    assert all(0.01 < t["p"] < 0.05 and not t["significant"] for t in v["tests"]), v["tests"]
    assert v["verdict"] == INCONCLUSIVE


def test_claim3_verdicts():
    assert _verdict({("a", "small"): {"kl": LOW, "js": HIGH}}, 3) == INCONCLUSIVE          # one size only
    persists = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": LOW, "js": HIGH}}
    assert _verdict(persists, 3) == HOLDS
    vanishes = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": LOW, "js": [1.0, 1.3, 0.8]}}
    assert _verdict(vanishes, 3) == DOES_NOT_HOLD
    # Significant at the largest size but significantly shrinking: neither persisting nor vanishing.
    shrinks = {("a", "small"): {"kl": LOW, "js": [5.0, 5.2, 4.8]}, ("a", "large"): {"kl": LOW, "js": HIGH}}
    assert _verdict(shrinks, 3) == INCONCLUSIVE


def test_claim3_regresses_per_seed_gaps_on_log_parameters():
    # Gap js − kl: 2.0, 2.1, 1.9 at the small size and 4.0, 4.1, 3.9 at the large one (10× the parameters):
    # slope (4.0 − 2.0) / ln 10 per ln(parameters).
    spec = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": LOW, "js": [5.0, 5.2, 4.8]}}
    v = _verdicts(spec)[2]
    slope = v["tests"][1]
    assert v["figures"]["a"]["worst"] == "js" and v["figures"]["a"]["best"] == "kl"
    assert slope["test"] == "slope" and slope["n"] == 6 and slope["diff"] == pytest.approx(2.0 / 2.302585093, rel=1e-6)
    assert slope["lo"] > 0 and v["verdict"] == HOLDS


def test_every_verdict_names_its_claim_figures_and_tests():
    spec = {("a", "small"): {"kl": HIGH, "js": LOW}, ("a", "large"): {"kl": HIGH, "js": LOW}}
    verdicts = _verdicts(spec)
    assert [v["claim"] for v in verdicts] == [1, 2, 3]
    for v in verdicts:
        assert v["statement"] == CLAIMS[v["claim"]] and v["why"] and v["figures"] and v["tests"]
        for t in v["tests"]:
            assert t["lo"] <= t["diff"] <= t["hi"] and "p_holm" in t
    assert verdicts[1]["figures"]["a/small"] == {"js": 1.0, "kl": 3.0, "js/kl": 0.333}
    with pytest.raises(ValueError, match=r"no parameter count for sizes \['huge'\]"):
        claim_verdicts(synthetic_cells(spec), ["small", "huge"], PARAMETERS)


def test_one_seed_cannot_decide_anything():
    spec = {("a", "small"): {"kl": [1.0], "js": [3.0]}, ("a", "large"): {"kl": [1.0], "js": [5.0]}}
    verdicts = _verdicts(spec)
    assert [v["verdict"] for v in verdicts] == [INCONCLUSIVE] * 3
    for v in verdicts:
        assert all(t["p"] is None and not t["significant"] for t in v["tests"]), v["tests"]
    assert verdicts[1]["tests"][0]["test"] == "none" and verdicts[1]["tests"][0]["diff"] == -2.0
    assert "(no interval)" in verdicts[2]["why"] and "p n/a" in verdicts[2]["why"]
