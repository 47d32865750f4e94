"""λ fitting for distributional targets p ∝ a·exp(λ·φ): SNIS fit from q ≠ a, checked EXACTLY by enumeration.

Problem: the toy LM (3 tokens + EOS, ≤ 4 tokens: 121 sequences); base a = a random ToyLM, proposal q = a
with its logits perturbed (so q ≠ a). Features (tests/helpers.py): φ_zeros = share of the 4 slots
holding token 0, φ_length = length/4; E_a[φ] = (0.0875, 0.327). Targets: zeros 0.15 (one feature) and
(0.15, 0.40) (two features).
"""

import math

import pytest
import torch

from fdpg_scale.core.moment_fitting import fit_lambdas
from fdpg_scale.targets.energy import ExponentialScorer
from fdpg_scale.toy.model import ToyLM
from tests.helpers import toy_features, toy_samples

TARGETS = {("zeros",): [0.15], ("zeros", "length"): [0.15, 0.40]}


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    a = ToyLM(3, 4, init_scale=0.5, generator=g)
    q = a.clone()
    with torch.no_grad():
        q.logits += 0.3 * torch.randn(q.logits.shape, generator=g, dtype=q.logits.dtype)
    feats = toy_features(a.eos, 4)
    seqs = a.all_sequences()
    samples = toy_samples(a, seqs)
    with torch.no_grad():
        return dict(a=a, q=q, feats=feats, log_a=a.log_prob(seqs), log_q=q.log_prob(seqs),
                    phi={name: fn(samples) for name, fn in feats.items()})


def exact_moments(toy, names, lambdas):
    """E_p[φ] under p ∝ a·exp(λ·φ), summed over all 121 sequences."""
    phi = torch.stack([toy["phi"][n] for n in names], -1)
    p = torch.softmax(toy["log_a"] + phi @ lambdas, 0)
    return p @ phi


@pytest.mark.parametrize("names", list(TARGETS), ids=["1 feature", "2 features"])
def test_snis_fit_reaches_moments_exactly_within_1e_3(toy, names):
    """SNIS from N = 10⁷ draws of q, passed as (distinct sequence, count) pairs: the same SNIS estimator as the
    raw draws (test_aggregated_draws_give_the_same_fit checks it), at the cost of 121 rows. At this N the
    SNIS standard error of each moment is < 2.5e-4, so 1e-3 is a margin of > 4 of them (measured over sampling
    seeds 1–20: worst exact error 2.9e-4 with one feature, 4.9e-4 with two)."""
    target = torch.tensor(TARGETS[names], dtype=torch.float64)
    q_probs = toy["log_q"].exp()
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.multinomial(q_probs, 10_000_000, replacement=True, generator=g),
                            minlength=q_probs.shape[0]).double()
    seen = counts > 0
    phi = torch.stack([toy["phi"][n] for n in names], -1)
    fit = fit_lambdas(phi[seen], target, toy["log_a"][seen], toy["log_q"][seen], counts=counts[seen])
    assert fit.error < 1e-6 and fit.iterations <= 10
    assert float(fit.moment_stderr.max()) < 2.5e-4, fit.moment_stderr
    exact = exact_moments(toy, names, fit.lambdas)
    err = (exact - target).abs()
    assert float(err.max()) < 1e-3, f"exact E_p[φ] = {exact.tolist()} vs target {target.tolist()}"


def test_aggregated_draws_give_the_same_fit(toy):
    g = torch.Generator().manual_seed(2)
    idx = torch.multinomial(toy["log_q"].exp(), 5000, replacement=True, generator=g)
    phi = torch.stack([toy["phi"]["zeros"], toy["phi"]["length"]], -1)
    raw = fit_lambdas(phi[idx], [0.15, 0.4], toy["log_a"][idx], toy["log_q"][idx], tol=1e-10)
    counts = torch.bincount(idx, minlength=phi.shape[0]).double()
    seen = counts > 0
    agg = fit_lambdas(phi[seen], [0.15, 0.4], toy["log_a"][seen], toy["log_q"][seen], counts=counts[seen], tol=1e-10)
    torch.testing.assert_close(agg.lambdas, raw.lambdas, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(agg.moment_stderr, raw.moment_stderr, rtol=1e-8, atol=0)
    assert agg.ess == pytest.approx(raw.ess, rel=1e-8) and raw.ess < 5000


@pytest.mark.parametrize("names", list(TARGETS), ids=["1 feature", "2 features"])
def test_scorer_fit_on_toy_samples(toy, names):
    """The ExponentialScorer path: sequences drawn token by token from q, features read from ``Samples``;
    the SNIS moments hit the target to tol, and the exact moments are within 4 reported standard errors."""
    seqs = toy["q"].sample(100_000, torch.Generator().manual_seed(3))
    samples = toy_samples(toy["q"], seqs)
    with torch.no_grad():
        log_a, log_q = toy["a"].log_prob(seqs), toy["q"].log_prob(seqs)
    scorer = ExponentialScorer({n: toy["feats"][n] for n in names})
    fitted, fit = scorer.fit(samples, TARGETS[names], log_a=log_a, log_q=log_q)
    assert fit.error < 1e-6 and fit.ess > 0.5 * seqs.shape[0]
    assert torch.equal(fitted.lambdas, fit.lambdas) and torch.equal(scorer.lambdas, torch.zeros(len(names),
                                                                                                 dtype=torch.float64))
    assert_close_log_score(fitted, samples, fit.lambdas)
    exact = exact_moments(toy, names, fit.lambdas)
    target = torch.tensor(TARGETS[names], dtype=torch.float64)
    assert bool(((exact - target).abs() <= 4 * fit.moment_stderr).all()), (exact, fit.moment_stderr)


def assert_close_log_score(scorer, samples, lambdas):
    expected = (scorer.features(samples) @ lambdas).float()
    torch.testing.assert_close(scorer.log_score(samples), expected)


def test_fit_on_full_enumeration_is_exact(toy):
    """Every sequence once with log q = 0: the 'samples' are the support itself, so μ̂ is the exact E_p[φ]."""
    names = ("zeros", "length")
    phi = torch.stack([toy["phi"][n] for n in names], -1)
    fit = fit_lambdas(phi, [0.15, 0.4], toy["log_a"], torch.zeros_like(toy["log_a"]), tol=1e-10, min_ess=0)
    torch.testing.assert_close(exact_moments(toy, names, fit.lambdas), torch.tensor([0.15, 0.4], dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_unreachable_moments_raise(toy):
    phi = torch.stack([toy["phi"]["zeros"], toy["phi"]["length"]], -1)
    zeros_q = torch.zeros_like(toy["log_a"])
    with pytest.raises(ValueError, match=r"target moment 0 = 1.2 is unreachable: the observed feature 0 lies in "
                                         r"\[0, 1\]"):
        fit_lambdas(phi[:, :1], [1.2], toy["log_a"], zeros_q)
    # Inside each feature's range but outside the hull: a sequence never has more zeros than tokens.
    with pytest.raises(ValueError, match="outside the convex hull"):
        fit_lambdas(phi, [0.6, 0.4], toy["log_a"], zeros_q)
    # Rows with a(x) = 0 do not count: without the all-zeros sequence "0000", zeros = 1 is out of reach.
    log_a = toy["log_a"].clone()
    log_a[phi[:, 0] == 1.0] = -math.inf
    with pytest.raises(ValueError, match=r"target moment 0 = 1 is unreachable: .* lies in \[0, 0.75\]"):
        fit_lambdas(phi[:, :1], [1.0], log_a, zeros_q)


def test_ess_collapse_and_non_convergence_raise():
    # One sample out of 100 has φ = 1: reaching E[φ] = 0.99 puts 99 % of the weight on it (ESS ≈ 1).
    phi = torch.zeros(100, 1, dtype=torch.float64)
    phi[17] = 1.0
    zeros = torch.zeros(100, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"effective sample size collapsed to 1\.0\d < min_ess = 10"):
        fit_lambdas(phi, [0.99], zeros, zeros)
    fit = fit_lambdas(phi, [0.99], zeros, zeros, min_ess=1.0)
    assert fit.moments.item() == pytest.approx(0.99, abs=1e-6)
    with pytest.raises(RuntimeError, match="no convergence after 1 Newton iterations"):
        fit_lambdas(phi, [0.99], zeros, zeros, max_iter=1, min_ess=1.0)


def test_fit_rejects_bad_shapes():
    z = torch.zeros(5)
    with pytest.raises(ValueError, match=r"phi must be \[N, K\] with K = len\(target_moments\) = 2, got phi of shape "
                                         r"\(5, 1\)"):
        fit_lambdas(torch.rand(5, 1), [0.1, 0.2], z, z)
    with pytest.raises(ValueError, match=r"log_a and log_q must be \[N\] = \(5,\), got \(4,\) and \(5,\)"):
        fit_lambdas(torch.rand(5, 1), [0.5], z[:4], z)
    with pytest.raises(ValueError, match="log_q must be finite"):
        fit_lambdas(torch.rand(5, 1), [0.5], z, torch.tensor([0.0, -math.inf, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"all 5 samples have a\(x\) = 0"):
        fit_lambdas(torch.rand(5, 1), [0.5], torch.full((5,), -math.inf), z)
    with pytest.raises(ValueError, match=r"counts must be \[N\] = \(5,\) positive"):
        fit_lambdas(torch.rand(5, 1), [0.5], z, z, counts=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
