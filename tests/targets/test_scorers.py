"""Scorers, EnergyTarget validation, Samples and context grouping on hand-made batches."""

import math

import pytest
import torch

from fdpg_scale.targets.samples import Samples
from fdpg_scale.core.logspace import context_groups
from fdpg_scale.targets.energy import BooleanScorer, EnergyTarget, ExponentialScorer, RewardScorer, Scorer
from tests.helpers import assert_close


def make_samples():
    """Four generations of different lengths, with texts and two contexts."""
    ids = torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0], [8, 8, 8, 8], [9, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    return Samples(token_ids=ids, mask=mask, texts=["the cat sat", "the", "dog dog dog dog", "a cat"],
                   context_ids=torch.tensor([3, 1, 3, 1]), contexts=["Q: x", "Q: y", "Q: x", "Q: y"])


class Const:
    """A scorer returning fixed log-scores, to feed EnergyTarget bad values."""

    def __init__(self, values, name="const"):
        self.values, self.name = values, name

    def log_score(self, samples):
        return torch.as_tensor(self.values, dtype=torch.float32)


def test_samples_fields_and_helpers():
    s = make_samples()
    assert s.mask.dtype == torch.bool
    assert s.batch_size == 4
    assert s.lengths.tolist() == [3, 1, 4, 2]
    assert s.sequences() == [(5, 6, 7), (5,), (8, 8, 8, 8), (9, 5)]
    sub = s.select(torch.tensor([2, 0]))
    assert sub.sequences() == [(8, 8, 8, 8), (5, 6, 7)]
    assert sub.texts == ["dog dog dog dog", "the cat sat"] and sub.contexts == ["Q: x", "Q: x"]
    assert sub.context_ids.tolist() == [3, 3]
    assert s.select(s.context_ids == 1).texts == ["the", "a cat"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_ids=torch.zeros(2, 3), mask=torch.ones(2, 3)), "token_ids must be an integer tensor"),
    (dict(token_ids=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 4)), r"mask .* shape \(2, 3\)"),
    (dict(token_ids=torch.zeros(2, 3, dtype=torch.long), mask=torch.full((2, 3), 2)), "bool or 0/1 values"),
    (dict(token_ids=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3), texts=["a"]), "texts has 1"),
    (dict(token_ids=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3), context_ids=torch.zeros(3)),
     "context_ids must be an integer tensor"),
])
def test_samples_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Samples(**kwargs)


def test_boolean_scorer_values():
    s = make_samples()
    has_cat = BooleanScorer(lambda b: ["cat" in t for t in b.texts], name="cat")
    assert isinstance(has_cat, Scorer)
    assert has_cat.log_score(s).tolist() == [0.0, -math.inf, -math.inf, 0.0]
    assert has_cat.log_score(s).dtype == torch.float32
    # 0/1 numbers and token-id based functions work the same way.
    short = BooleanScorer(lambda b: (b.lengths <= 2).long(), name="short")
    assert short.log_score(s).tolist() == [-math.inf, 0.0, -math.inf, 0.0]


def test_boolean_scorer_rejects_non_bool():
    s = make_samples()
    with pytest.raises(ValueError, match=r"BooleanScorer 'bad' returned 2 at sample 1"):
        BooleanScorer(lambda b: [0, 2, 1, 1], name="bad").log_score(s)
    with pytest.raises(ValueError, match=r"BooleanScorer 'short' returned shape \(3,\), expected \[B\] = \(4,\)"):
        BooleanScorer(lambda b: [True, False, True], name="short").log_score(s)


def test_reward_scorer_values():
    s = make_samples()
    r = RewardScorer(lambda b: b.lengths.float(), beta=0.5, name="len")
    assert r.log_score(s).tolist() == [6.0, 2.0, 8.0, 4.0]
    for beta in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            RewardScorer(lambda b: b.lengths.float(), beta=beta)


def test_exponential_scorer_values():
    s = make_samples()
    e = ExponentialScorer({"len": lambda b: b.lengths.float(),
                           "dog": lambda b: [t.count("dog") for t in b.texts]}, [0.5, -1.0], name="exp")
    assert e.features(s).tolist() == [[3, 0], [1, 0], [4, 4], [2, 0]]
    assert e.log_score(s).tolist() == [1.5, 0.5, -2.0, 1.0]
    assert ExponentialScorer({"len": lambda b: b.lengths.float()}).log_score(s).tolist() == [0.0] * 4
    assert e.with_lambdas([1.0, 0.0]).log_score(s).tolist() == [3.0, 1.0, 4.0, 2.0]
    with pytest.raises(ValueError, match=r"lambdas must be 2 finite floats"):
        ExponentialScorer({"a": len, "b": len}, [1.0])
    bad = ExponentialScorer({"len": lambda b: torch.tensor([1.0, math.nan, 0.0, 0.0])}, name="exp")
    with pytest.raises(ValueError, match=r"feature 'len' of ExponentialScorer 'exp' is nan at sample 1"):
        bad.log_score(s)


def test_energy_target_sums_scores_and_base():
    s = make_samples()
    target = EnergyTarget([
        BooleanScorer(lambda b: ["cat" in t for t in b.texts], name="cat"),
        RewardScorer(lambda b: b.lengths.float(), beta=2.0, name="len"),
        ExponentialScorer({"n_the": lambda b: [t.count("the") for t in b.texts]}, [0.25]),
    ])
    base = torch.tensor([-3.0, -1.0, -4.0, -2.0])
    expected = torch.tensor([-3.0 + 1.5 + 0.25, -math.inf, -math.inf, -2.0 + 1.0])
    assert_close(target.log_target(base, s), expected, name="log P")
    assert_close(target.log_scores(s), expected - base, name="log scores")
    feats = target.features(s)
    assert feats["cat"].tolist() == [1.0, 0.0, 0.0, 1.0] and feats["n_the"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert EnergyTarget([]).log_target(base, s).tolist() == base.tolist()
    # float64 base log-probs keep their precision.
    assert target.log_target(base.double(), s).dtype == torch.float64


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_energy_target_rejects_nan_and_posinf_naming_scorer_and_index(bad):
    s = make_samples()
    target = EnergyTarget([Const([0.0, 0.0, 0.0, 0.0], "ok"), Const([0.0, -1.0, bad, 0.0], "broken")])
    with pytest.raises(ValueError, match=r"scorer 'broken' returned log-score (nan|inf) at sample 2"):
        target.log_scores(s)
    with pytest.raises(ValueError, match=r"scorer 'broken' .* at sample 2"):
        target.log_target(torch.zeros(4), s)


def test_energy_target_accepts_neginf_and_checks_shapes():
    s = make_samples()
    target = EnergyTarget([Const([-math.inf, 0.0, -math.inf, 1.0])])
    assert target.log_target(torch.zeros(4), s).tolist() == [-math.inf, 0.0, -math.inf, 1.0]
    with pytest.raises(ValueError, match=r"scorer 'short' returned shape \(3,\), expected \[B\] = \(4,\)"):
        EnergyTarget([Const([0.0, 0.0, 0.0], "short")]).log_scores(s)
    with pytest.raises(ValueError, match=r"base_logprob must be a tensor \[B\] = \(4,\), got \(4, 1\)"):
        target.log_target(torch.zeros(4, 1), s)
    with pytest.raises(ValueError, match=r"base_logprob is nan at sample 3"):
        target.log_target(torch.tensor([0.0, 0.0, 0.0, math.nan]), s)
    with pytest.raises(ValueError, match="is not a scorer"):
        EnergyTarget([lambda s: s])
    with pytest.raises(ValueError, match="names must be unique"):
        EnergyTarget([Const([0.0] * 4, "x"), Const([0.0] * 4, "x")])


def test_conditional_scorer_reads_context_and_groups():
    s = make_samples()
    # P(x|c): a constraint that depends on the context (answers to "Q: x" must mention a cat).
    cond = BooleanScorer(lambda b: [c != "Q: x" or "cat" in t for t, c in zip(b.texts, b.contexts)], name="c")
    assert cond.log_score(s).tolist() == [0.0, 0.0, -math.inf, 0.0]
    unique, inverse = context_groups(s.context_ids, s.batch_size)
    assert unique.tolist() == [1, 3] and inverse.tolist() == [1, 0, 1, 0]
    assert torch.equal(unique[inverse], s.context_ids)
    unique, inverse = context_groups(None, 3)
    assert unique.tolist() == [0] and inverse.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"context_ids must be \[B\] = \(4,\), got \(3,\)"):
        context_groups(torch.tensor([0, 1, 2]), 4)
