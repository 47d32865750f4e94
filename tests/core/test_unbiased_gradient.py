"""The f-DPG estimator's expected gradient IS the gradient of the exact D_f(π‖p).

On the enumerable toy the expectation over q is a finite sum, so no sampling is involved:

    E_q[w(x) ∇log π(x)] = Σ_x q(x)·w(x)·∇log π(x) = ∇_θ Σ_x q(x)·w(x).detach()·log π_θ(x),
    w = (π/q)·(B + f′(π/p)),   p = P/Z with the exact Z,

and this must equal autograd's ∇_θ D_f(π_θ‖p) of ``exact_divergence`` (D_f depends on θ only through π) to
relative error ≤ 1e-6 in float64, for every divergence, with q = π and q ≠ π, with B = 0 and B ≠ 0.
The weights are the module docstring's formula in float64 (from ``divergence.f_prime``); ``fdiv_weights``
(float32) must agree with them to float32 precision. Negative controls show the check can fail.

Targets: *exponential* P = a·exp(λφ) + const (full support: every D_f finite) and *pointwise* P = a·b,
b = [token 0 in x]; on the latter D_f(π‖p) is finite iff f′(∞) is finite, i.e. for kl, tv, js, chi2,
hellinger and alpha(0.5), and +inf for rkl, rchi2 and alpha(2) (π > 0 where p = 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.kernels import fdiv_weights
from fdpg_scale.toy.model import ToyLM, exact_divergence, exact_log_z
from tests.helpers import assert_close

K, L = 3, 4
ALL = [("kl", None), ("rkl", None), ("tv", None), ("js", None), ("chi2", None), ("rchi2", None),
       ("hellinger", None), ("alpha", 0.5), ("alpha", 2.0)]
FINITE_ON_POINTWISE = [("kl", None), ("tv", None), ("js", None), ("chi2", None), ("hellinger", None),
                       ("alpha", 0.5)]
INFINITE_ON_POINTWISE = [("rkl", None), ("rchi2", None), ("alpha", 2.0)]
BASELINES = [0.0, 1.7]


def _lm(seed: int, scale: float = 1.0) -> ToyLM:
    return ToyLM(K, L, init_scale=scale, generator=torch.Generator().manual_seed(seed))


def _problem(target: str, q_kind: str):
    """(π, log P [N], log q [N]) in float64; log P unnormalised (Z ≠ 1)."""
    pi = _lm(0)
    seqs = pi.all_sequences()
    log_a = _lm(1).log_prob_all().detach()
    if target == "exponential":
        phi = torch.randn(pi.num_sequences, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        log_P = log_a + 0.8 * phi + 1.3
    else:
        has_zero = ((seqs == 0) & pi.mask(seqs)).any(dim=1)
        log_P = torch.where(has_zero, log_a + 1.3, torch.full_like(log_a, -math.inf))
    log_q = pi.log_prob_all().detach() if q_kind == "pi" else _lm(3, scale=1.5).log_prob_all().detach()
    return pi, log_P, log_q


def _weights64(d, log_pi, log_q, log_P, log_z, baseline):
    """w = (π/q)·(B + f′(log t)), log t = log π − (log P − log Z), all float64 (log t = +inf where P = 0)."""
    return torch.exp(log_pi - log_q) * (baseline + d.f_prime(log_pi - (log_P - log_z)))


def _exact_grad(pi, d, log_P):
    log_p = log_P - exact_log_z(log_P)
    (g,) = torch.autograd.grad(exact_divergence(d, pi.log_prob_all(), log_p), pi.logits)
    return g


def _estimator_grad(pi, log_q, weight):
    """∇ Σ_x q(x)·weight(x)·log π(x): the exact expectation over q of the estimator's gradient."""
    surrogate = (torch.exp(log_q) * weight.detach().to(torch.float64) * pi.log_prob_all()).sum()
    (g,) = torch.autograd.grad(surrogate, pi.logits)
    return g


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _check(target, name, alpha, q_kind, baseline):
    d = get_divergence(name, alpha=alpha)
    pi, log_P, log_q = _problem(target, q_kind)
    log_z = exact_log_z(log_P)
    g_true = _exact_grad(pi, d, log_P)
    assert float(g_true.norm()) > 1e-3                       # a nontrivial gradient to compare with
    log_pi = pi.log_prob_all().detach()
    w64 = _weights64(d, log_pi, log_q, log_P, log_z, baseline)
    assert torch.isfinite(w64).all()
    rel64 = _rel(_estimator_grad(pi, log_q, w64), g_true)
    assert rel64 <= 1e-6, f"{d}, q={q_kind}, B={baseline}: relative error {rel64:.3e}"

    # The shipped float32 weights: the same numbers to float32 precision, hence the same gradient.
    w32 = fdiv_weights(log_pi, log_q, log_P, float(log_z), d, baseline=baseline)
    assert w32.weight.dtype == torch.float32
    scale = float(w64.abs().max())
    assert_close(w32.weight, w64, rtol=1e-5, atol=1e-6 * scale, name=f"fdiv_weights({d}).weight")
    rel32 = _rel(_estimator_grad(pi, log_q, w32.weight), g_true)
    assert rel32 <= 1e-5, f"{d} with fdiv_weights (float32): relative error {rel32:.3e}"
    return rel64


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("q_kind", ["pi", "other"])
@pytest.mark.parametrize("name,alpha", ALL, ids=[f"{n}{a or ''}" for n, a in ALL])
def test_unbiased_gradient_full_support(name, alpha, q_kind, baseline):
    _check("exponential", name, alpha, q_kind, baseline)


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("q_kind", ["pi", "other"])
@pytest.mark.parametrize("name,alpha", FINITE_ON_POINTWISE, ids=[f"{n}{a or ''}" for n, a in FINITE_ON_POINTWISE])
def test_unbiased_gradient_pointwise_target(name, alpha, q_kind, baseline):
    _check("pointwise", name, alpha, q_kind, baseline)


@pytest.mark.parametrize("name,alpha", INFINITE_ON_POINTWISE, ids=[f"{n}{a or ''}" for n, a in INFINITE_ON_POINTWISE])
def test_divergences_infinite_on_pointwise_target(name, alpha):
    pi, log_P, _ = _problem("pointwise", "pi")
    log_p = log_P - exact_log_z(log_P)
    value = exact_divergence(get_divergence(name, alpha=alpha), pi.log_prob_all().detach(), log_p)
    assert math.isinf(float(value)) and float(value) > 0


# ------------------------------------------------------------------------------------ negative controls
def test_control_wrong_log_z_breaks_it():
    """kl's f′ = −p/π scales with 1/Z: a log Z off by 0.5 scales the gradient by e^0.5, detectably."""
    d = get_divergence("kl")
    pi, log_P, log_q = _problem("exponential", "other")
    g_true = _exact_grad(pi, d, log_P)
    w = _weights64(d, pi.log_prob_all().detach(), log_q, log_P, exact_log_z(log_P) + 0.5, 0.0)
    assert _rel(_estimator_grad(pi, log_q, w), g_true) > 0.1


def test_control_missing_importance_ratio_breaks_it():
    d = get_divergence("rkl")
    pi, log_P, log_q = _problem("exponential", "other")
    g_true = _exact_grad(pi, d, log_P)
    log_pi = pi.log_prob_all().detach()
    w = d.f_prime(log_pi - (log_P - exact_log_z(log_P)))            # no π/q
    assert _rel(_estimator_grad(pi, log_q, w), g_true) > 0.1


def test_control_baseline_outside_the_ratio_is_biased_off_policy():
    """B must sit inside the importance ratio: (π/q)·f′ + B (B outside) is biased when q ≠ π."""
    d = get_divergence("js")
    pi, log_P, log_q = _problem("exponential", "other")
    g_true = _exact_grad(pi, d, log_P)
    log_pi = pi.log_prob_all().detach()
    w = torch.exp(log_pi - log_q) * d.f_prime(log_pi - (log_P - exact_log_z(log_P))) + 1.7
    assert _rel(_estimator_grad(pi, log_q, w), g_true) > 0.1
