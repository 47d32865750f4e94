"""``fdpg_step``, the step ``fdpg-scale train`` runs on the ZeRO-3 engines, proven on the enumerable toy backend.

With a proposal q uniform over the N sequences and ``enumerate_all`` (each sequence drawn exactly once), one
step's loss mean_i(w_i · log π(x_i)) has gradient (1/N) Σ_x w(x) ∇log π(x) = E_q[w ∇log π]: the estimator's
exact expectation. The step's running Ẑ after that batch is (1/N) Σ_x P(x)/q(x) = Σ_x P(x) = Z exactly, so the
step's gradient must equal autograd's ∇_θ D_f(π_θ‖p) of the exact divergence, for every divergence, with and
without a baseline, off- and on-policy. SGD with lr 1 turns the gradient into the parameter change we read.
A wrong sign, a missing importance ratio, a baseline outside the ratio or a stale log Z would all fail here.
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.core.estimator import MovingAverageBaseline, PerContextLogZ
from fdpg_scale.core.step import FDPGState, StepSettings, fdpg_step
from fdpg_scale.toy.backend import ToyBackend
from fdpg_scale.toy.model import ToyLM, exact_divergence, exact_log_z, normalise

K, L = 3, 3
FULL_SUPPORT = [("kl", None), ("rkl", None), ("tv", None), ("js", None), ("chi2", None), ("rchi2", None),
                ("hellinger", None), ("alpha", 0.5), ("alpha", 2.0)]
FINITE_ON_POINTWISE = [("kl", None), ("tv", None), ("js", None), ("chi2", None), ("hellinger", None),
                       ("alpha", 0.5)]


def _lm(seed: int, scale: float = 1.0) -> ToyLM:
    return ToyLM(K, L, init_scale=scale, generator=torch.Generator().manual_seed(seed))


def _uniform() -> ToyLM:
    lm = _lm(0)
    return lm.set_distribution_(torch.full((lm.num_sequences,), -math.log(lm.num_sequences), dtype=torch.float64))


def _log_target(kind: str, seqs: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    if kind == "exponential":
        phi = torch.randn(len(log_a), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        return log_a + 0.8 * phi + 1.3
    has_zero = (seqs == 0).any(dim=1)
    return torch.where(has_zero, log_a + 1.3, torch.full_like(log_a, -math.inf))


def _one_exact_step(name, alpha, kind, baseline, *, on_policy=False):
    """(gradient the step applied, exact ∇D_f) at the same π."""
    d = get_divergence(name, alpha=alpha)
    pi = _uniform() if on_policy else _lm(0)
    q = None if on_policy else _uniform()
    seqs = pi.all_sequences()
    log_a = _lm(1).log_prob_all().detach()
    log_P = _log_target(kind, seqs, log_a)
    log_p = normalise(log_P)
    exact = torch.autograd.grad(exact_divergence(d, pi.log_prob_all(), log_p), pi.logits)[0]
    before = pi.logits.detach().clone()
    backend = ToyBackend(policy=pi, proposal=q, log_target=log_P, log_base=log_a,
                         optimizer=torch.optim.SGD(pi.parameters(), lr=1.0), batch=1,
                         generator=torch.Generator().manual_seed(0), enumerate_all=True)
    state = FDPGState(log_z=PerContextLogZ(1), baseline=MovingAverageBaseline(0.9), proposal_schedule=None)
    if baseline:
        state.baseline.values[:], state.baseline.counts[:] = baseline, 1
    result = fdpg_step(backend, state, StepSettings(divergence=d), 0)
    assert math.isclose(float(state.log_z.value[0]), float(exact_log_z(log_P)), rel_tol=1e-12)  # Ẑ = Z exactly
    assert result.baseline_used == baseline
    return before - pi.logits.detach(), exact


def _rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("baseline", [0.0, 1.7])
@pytest.mark.parametrize("name,alpha", FULL_SUPPORT)
def test_step_gradient_is_exact_full_support(name, alpha, baseline):
    got, exact = _one_exact_step(name, alpha, "exponential", baseline)
    assert _rel_err(got, exact) < 2e-6, _rel_err(got, exact)       # float32 weights, float64 everything else


@pytest.mark.parametrize("name,alpha", FINITE_ON_POINTWISE)
def test_step_gradient_is_exact_pointwise(name, alpha):
    got, exact = _one_exact_step(name, alpha, "pointwise", 0.6)
    assert _rel_err(got, exact) < 2e-6, _rel_err(got, exact)


@pytest.mark.parametrize("name,alpha", [("js", None), ("rkl", None), ("kl", None)])
def test_step_gradient_is_exact_on_policy(name, alpha):
    got, exact = _one_exact_step(name, alpha, "exponential", 0.0, on_policy=True)
    assert _rel_err(got, exact) < 2e-6, _rel_err(got, exact)


def test_control_a_stale_log_z_breaks_it():
    """The same step whose log Z was biased to 2Z by earlier terms (as the skipping estimator was) is off."""
    d = get_divergence("kl")
    pi, q = _lm(0), _uniform()
    seqs = pi.all_sequences()
    log_a = _lm(1).log_prob_all().detach()
    log_P = _log_target("pointwise", seqs, log_a)
    exact = torch.autograd.grad(exact_divergence(d, pi.log_prob_all(), normalise(log_P)), pi.logits)[0]
    before = pi.logits.detach().clone()
    backend = ToyBackend(policy=pi, proposal=q, log_target=log_P, log_base=log_a,
                         optimizer=torch.optim.SGD(pi.parameters(), lr=1.0), batch=1,
                         generator=torch.Generator(), enumerate_all=True)
    state = FDPGState(log_z=PerContextLogZ(1), baseline=MovingAverageBaseline(0.9), proposal_schedule=None)
    n = pi.num_sequences                                                  # n earlier terms of 3Z, then n of mean Z
    state.log_z.update(torch.full((n,), float(exact_log_z(log_P)) + math.log(3.0), dtype=torch.float64),
                       torch.zeros(n, dtype=torch.long))
    fdpg_step(backend, state, StepSettings(divergence=d), 0)
    assert _rel_err(before - pi.logits.detach(), exact) > 1e-2


def test_samples_without_a_z_estimate_give_finite_weights():
    """Before any sample with P > 0, log Ẑ = −inf; P = 0 samples have t = ∞ whatever Z, so the weights are
    the outside-support limits (TV: r = −½ → w = ρ/2 > 0 pushes π down there), never NaN."""
    pi, q = _lm(0), _lm(4)
    n = pi.num_sequences
    log_P = torch.full((n,), -math.inf, dtype=torch.float64)
    backend = ToyBackend(policy=pi, proposal=q, log_target=log_P, log_base=torch.zeros(n, dtype=torch.float64),
                         optimizer=torch.optim.SGD(pi.parameters(), lr=0.0), batch=16,
                         generator=torch.Generator().manual_seed(0))
    state = FDPGState(log_z=PerContextLogZ(1), baseline=MovingAverageBaseline(0.9), proposal_schedule=None)
    result = fdpg_step(backend, state, StepSettings(divergence=get_divergence("tv")), 0)
    assert state.log_z.value[0] == -math.inf and not bool(state.log_z.has_estimate[0])
    w, rho = result.batch.weight, result.batch.importance_ratio
    assert torch.isfinite(w).all()
    assert torch.allclose(w, 0.5 * rho, rtol=1e-6)
