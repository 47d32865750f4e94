"""The enumerable toy LM: enumeration, probabilities, sampling, exact representation, exact divergences."""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.toy.model import ToyLM, exact_divergence, exact_kl, exact_log_z, normalise
from tests.helpers import assert_close

SIZES = [(1, 1), (1, 4), (2, 3), (3, 4), (4, 2)]


def _model(k, L, seed=0, scale=1.0):
    return ToyLM(k, L, init_scale=scale, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k,L", SIZES)
def test_enumeration_is_complete_and_indexed(k, L):
    m = _model(k, L)
    seqs = m.all_sequences()
    assert seqs.shape == (sum(k ** n for n in range(L + 1)), L) == (m.num_sequences, L)
    assert torch.equal(m.sequence_index(seqs), torch.arange(m.num_sequences))
    assert len({tuple(r) for r in seqs.tolist()}) == m.num_sequences
    lengths = m.lengths(seqs)
    for row, n in zip(seqs.tolist(), lengths.tolist()):
        assert all(t < k for t in row[:n])                  # n ordinary tokens,
        assert all(t == m.eos for t in row[n:])             # then EOS (chosen if n < L) and EOS padding
    mask = m.mask(seqs)
    assert torch.equal(mask.sum(1), torch.clamp(lengths + 1, max=L))   # decisions = n tokens + EOS if n < L


@pytest.mark.parametrize("k,L", SIZES)
def test_probabilities_sum_to_one_and_match_a_loop(k, L):
    m = _model(k, L, seed=1, scale=2.0)
    log_pi = m.log_prob_all().detach()
    assert abs(float(torch.logsumexp(log_pi, 0))) < 1e-12
    # Reference: walk each sequence token by token through the logit table with Python loops.
    logp = torch.log_softmax(m.logits.detach(), -1)
    offsets = [sum(k ** j for j in range(n)) for n in range(L + 2)]
    seqs = m.all_sequences()
    for i in range(0, m.num_sequences, max(1, m.num_sequences // 25)):
        row, total, code = seqs[i].tolist(), 0.0, 0
        for t in range(L):
            total += float(logp[offsets[t] + code, row[t]])
            if row[t] == m.eos:
                break
            code = code * k + row[t]
        assert math.isclose(float(log_pi[i]), total, rel_tol=1e-12, abs_tol=1e-12)
    tok = m.token_logprobs(seqs)
    assert torch.all(tok[~m.mask(seqs)] == 0)


def test_log_prob_is_differentiable_in_the_logits():
    m = _model(3, 3)
    m.log_prob_all().logsumexp(0).backward()
    # Σ_x π(x) = 1 for every θ: the gradient of its log is zero (to rounding).
    assert m.logits.grad is not None and float(m.logits.grad.abs().max()) < 1e-12


def test_samples_follow_the_model():
    m = _model(3, 4, seed=2)
    n = 60_000
    seqs = m.sample(n, torch.Generator().manual_seed(0))
    assert seqs.shape == (n, 4)
    counts = torch.bincount(m.sequence_index(seqs), minlength=m.num_sequences).double()
    expected = n * m.log_prob_all().detach().exp()
    # Pearson χ² against its df; bound = mean + 6 sd of the χ² distribution (a wrong sampler gives ≫ this).
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = m.num_sequences - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2
    # Rows past the first EOS are EOS, as all_sequences stores them.
    assert torch.equal(seqs, m.all_sequences()[m.sequence_index(seqs)])


@pytest.mark.parametrize("k,L", SIZES)
def test_represents_any_distribution_exactly(k, L):
    m = _model(k, L)
    g = torch.Generator().manual_seed(5)
    log_p = torch.randn(m.num_sequences, generator=g, dtype=torch.float64) * 3
    if m.num_sequences > 2:
        log_p[1::3] = -math.inf                               # holes in the support too
    log_p = normalise(log_p)
    got = m.set_distribution_(log_p).log_prob_all().detach()
    on = torch.isfinite(log_p)
    assert_close(got[on], log_p[on], rtol=1e-12, atol=1e-12, name="log π after set_distribution_")
    assert torch.all(torch.isneginf(got[~on]))


def test_clone_and_copy_are_independent():
    a, b = _model(2, 3, seed=0), _model(2, 3, seed=1)
    c = a.clone()
    assert torch.equal(c.logits, a.logits) and c.logits.data_ptr() != a.logits.data_ptr()
    with torch.no_grad():
        c.logits.add_(1.0)
    assert not torch.equal(c.logits, a.logits)
    b.copy_(a)
    assert torch.equal(b.logits, a.logits) and b.logits.data_ptr() != a.logits.data_ptr()
    with pytest.raises(ValueError, match="copy_ needs a ToyLM"):
        b.copy_(_model(3, 3))


def _direct(name, pi, p):
    """Textbook formulas over probabilities (not log space), float64."""
    m = (pi + p) / 2
    if name == "kl":
        return (p[p > 0] * torch.log(p[p > 0] / pi[p > 0])).sum()
    if name == "rkl":
        return (pi * torch.log(pi / p)).sum()
    if name == "tv":
        return 0.5 * (pi - p).abs().sum()
    if name == "js":
        kl_pm = (p[p > 0] * torch.log(p[p > 0] / m[p > 0])).sum()
        return 0.5 * (pi * torch.log(pi / m)).sum() + 0.5 * kl_pm
    if name == "chi2":
        return ((p - pi) ** 2 / pi).sum()
    if name == "rchi2":
        return ((pi - p) ** 2 / p).sum()
    if name == "hellinger":
        return ((pi.sqrt() - p.sqrt()) ** 2).sum()
    raise AssertionError(name)


@pytest.mark.parametrize("support", ["full", "partial"])
@pytest.mark.parametrize("name", ["kl", "rkl", "tv", "js", "chi2", "rchi2", "hellinger"])
def test_exact_divergence_matches_textbook_formulas(name, support):
    g = torch.Generator().manual_seed(7)
    log_pi = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    log_p = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    if support == "partial":
        log_p[::4] = -math.inf
        log_p = normalise(log_p)
    got = exact_divergence(name, log_pi, log_p)
    with torch.no_grad():
        expected = _direct(name, log_pi.exp(), log_p.exp())
    if support == "partial" and name in ("rkl", "rchi2"):
        assert math.isinf(float(got)) and float(got) > 0      # π puts mass where p has none
    else:
        assert math.isclose(float(got), float(expected), rel_tol=1e-12), (float(got), float(expected))


def test_exact_divergence_alpha_and_helpers():
    g = torch.Generator().manual_seed(8)
    log_pi = torch.log_softmax(torch.randn(30, generator=g, dtype=torch.float64), 0)
    log_P = torch.randn(30, generator=g, dtype=torch.float64) + 2.0
    assert math.isclose(float(exact_log_z(log_P)), math.log(float(log_P.exp().sum())), rel_tol=1e-13)
    log_p = normalise(log_P)
    pi, p = log_pi.exp(), log_p.exp()
    for a in (0.5, 2.0, -1.0):
        expected = ((pi / p) ** a * p - a * pi - (1 - a) * p).sum() / (a * (a - 1))
        got = exact_divergence(get_divergence("alpha", alpha=a), log_pi, log_p)
        assert math.isclose(float(got), float(expected), rel_tol=1e-10)
    # KL(p‖π) against the textbook sum over probabilities (not the log-space helper it is built on).
    assert math.isclose(float(exact_kl(log_pi, log_p)), float((p * (p / pi).log()).sum()), rel_tol=1e-12)
    p_point = p * (torch.arange(30) % 3 == 0)                         # p = 0 off a third of the support
    log_p_point = normalise(p_point.log())
    p_point = log_p_point.exp()
    on = p_point > 0
    assert math.isclose(float(exact_kl(log_pi, log_p_point)),              # 0·log 0 = 0 off the support
                        float((p_point[on] * (p_point[on] / pi[on]).log()).sum()), rel_tol=1e-12)
    pi_hole = normalise(torch.where(torch.arange(30) == 0, -math.inf, log_pi))
    assert float(exact_kl(pi_hole, log_p_point)) == math.inf               # π = 0 where p > 0


def test_bad_input_is_named():
    m = _model(2, 3)
    with pytest.raises(ValueError, match=r"seqs must be \[N, L=3\]"):
        m.log_prob(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="seqs must be a LongTensor"):
        m.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="ids outside"):
        m.log_prob(torch.full((1, 3), 7, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        ToyLM(0, 3)
    with pytest.raises(ValueError, match="max_len"):
        ToyLM(2, 0)
    with pytest.raises(ValueError, match="log_pi_all and log_p_all"):
        exact_divergence("kl", torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="log_p_all must be"):
        m.set_distribution_(torch.zeros(3))
    with pytest.raises(ValueError, match="log_p_all must be normalised"):
        exact_divergence("kl", torch.log(torch.full((4,), 0.25)), torch.zeros(4))
