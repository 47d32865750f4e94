"""Distinct-n and Self-BLEU-n against values computed by hand on tiny sets."""

import math

import pytest
import torch

from fdpg_scale.core.metrics import distinct_n, diversity_metrics, self_bleu
from fdpg_scale.targets.samples import Samples

TEXTS = ["a b c d", "a b c e", "x y z w"]
IDS = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 7, 8, 9]]  # the same set as token ids


def test_distinct_n_by_hand():
    # unigrams: 12 in all, 9 distinct (a b c d e x y z w); bigrams: ab bc cd ab bc ce xy yz zw → 7/9;
    # trigrams: abc bcd abc bce xyz yzw → 5/6.
    assert distinct_n(TEXTS, 1) == pytest.approx(9 / 12)
    assert distinct_n(TEXTS, 2) == pytest.approx(7 / 9)
    assert distinct_n(TEXTS, 3) == pytest.approx(5 / 6)
    assert [distinct_n(IDS, n) for n in (1, 2, 3)] == [distinct_n(TEXTS, n) for n in (1, 2, 3)]
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a b", "c"], 3) == 0.0  # no trigram at all
    with pytest.raises(ValueError, match="n must be ≥ 1"):
        distinct_n(TEXTS, 0)


def test_distinct_n_from_samples_ignores_padding():
    s = Samples(token_ids=torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 5, 0], [6, 7, 8, 9, 9]]),
                mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]))
    assert distinct_n(s.sequences(), 2) == pytest.approx(7 / 9)


def test_self_bleu_by_hand():
    # BLEU-2 of "a b c d" against {"a b c e", "x y z w"}: p1 = 3/4 (d unmatched), p2 = 2/3 (cd unmatched),
    # brevity penalty 1 (a reference of the same length) → sqrt(3/4 · 2/3) = sqrt(1/2); "a b c e" likewise;
    # "x y z w" matches no unigram → nltk's BLEU is 0.
    assert self_bleu(TEXTS, 2) == pytest.approx(2 * math.sqrt(0.5) / 3, rel=1e-12)
    assert self_bleu(IDS, 2) == pytest.approx(2 * math.sqrt(0.5) / 3, rel=1e-12)
    # BLEU-1 = p1 alone: (3/4 + 3/4 + 0)/3.
    assert self_bleu(TEXTS, 1) == pytest.approx(0.5, rel=1e-12)


def test_self_bleu_smoothing_and_brevity_by_hand():
    # "a b" vs "b a": p1 = 2/2, p2 = 0/1 → method1 smoothing turns 0 into ε/1 = 0.1 → BLEU-2 = sqrt(0.1).
    assert self_bleu(["a b", "b a"], 2) == pytest.approx(math.sqrt(0.1), rel=1e-12)
    # "a b c" vs "a b c d e f": p1 = p2 = 1, brevity penalty exp(1 − 6/3) = e^-1;
    # "a b c d e f" vs "a b c": p1 = 3/6, p2 = 2/5, no brevity penalty → sqrt(0.2).
    assert self_bleu(["a b c", "a b c d e f"], 2) == pytest.approx((math.exp(-1) + math.sqrt(0.2)) / 2, rel=1e-12)


def test_self_bleu_subsample():
    per_sample = [math.sqrt(0.5), math.sqrt(0.5), 0.0]
    assert self_bleu(TEXTS, 2, max_hypotheses=10) == pytest.approx(sum(per_sample) / 3)
    # One hypothesis, still scored against both others: one of the per-sample values, fixed by the seed.
    one = self_bleu(TEXTS, 2, max_hypotheses=1, seed=3)
    assert any(one == pytest.approx(v) for v in per_sample)
    assert one == self_bleu(TEXTS, 2, max_hypotheses=1, seed=3)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        self_bleu(["a b"], 2)


def test_diversity_metrics_keys():
    out = diversity_metrics(TEXTS, bleu_n=(1, 2))
    assert out == pytest.approx({"distinct_1": 0.75, "distinct_2": 7 / 9, "distinct_3": 5 / 6, "self_bleu_1": 0.5,
                                 "self_bleu_2": 2 * math.sqrt(0.5) / 3})
