"""The moving-average baseline: its statistic, its update rule, that a step uses it *before* updating it,
state round trips; and the loss ``fdpg_loss``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fdpg_scale.core import step as step_module
from fdpg_scale.toy import demo as toy_demo
from fdpg_scale.core.estimator import MovingAverageBaseline, fdpg_loss


def test_statistic_is_the_self_normalised_importance_weighted_mean():
    r = torch.tensor([1.0, -2.0, 4.0])
    rho = torch.tensor([0.5, 2.0, 1.5])
    assert math.isclose(MovingAverageBaseline.batch_statistic(r, rho), (0.5 - 4.0 + 6.0) / 4.0, rel_tol=1e-15)
    assert math.isclose(MovingAverageBaseline.batch_statistic(r), 1.0, rel_tol=1e-15)       # plain mean
    # An overflowed ratio dominates: the inf entries share the weight.
    assert MovingAverageBaseline.batch_statistic(r, torch.tensor([1.0, math.inf, math.inf])) == 1.0
    # A convex combination: stays within the observed rewards whatever the ratios.
    assert -2.0 <= MovingAverageBaseline.batch_statistic(r, torch.tensor([1e30, 1e-30, 1.0])) <= 4.0


def test_update_rule_and_first_update():
    b = MovingAverageBaseline(momentum=0.75)
    assert b.value == 0.0
    assert b.update(torch.tensor([2.0, 4.0])) == 3.0
    assert b.value == 3.0                                   # first update: the statistic itself, no decay to 0
    b.update(torch.tensor([7.0]))
    assert math.isclose(b.value, 0.75 * 3.0 + 0.25 * 7.0, rel_tol=1e-15)
    assert b.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])) is None      # every ρ underflowed
    assert math.isclose(b.value, 0.75 * 3.0 + 0.25 * 7.0, rel_tol=1e-15) and b.updates == 2
    off = MovingAverageBaseline(enabled=False)
    off.update(torch.tensor([5.0]))
    assert off.value == 0.0


def test_state_dict_round_trip():
    a = MovingAverageBaseline(0.9)
    a.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
    b = MovingAverageBaseline(0.9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for batch in (torch.tensor([0.3]), torch.tensor([-1.0, 8.0])):
        a.update(batch)
        b.update(batch)
        assert a.value == b.value


def test_bad_input_is_named():
    b = MovingAverageBaseline()
    with pytest.raises(ValueError, match="non-finite"):
        b.update(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match=r"importance_ratio has shape \[1\], expected \[2\]"):
        b.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="importance_ratio must be ≥ 0"):
        b.update(torch.tensor([1.0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageBaseline(1.0)
    assert b.value == 0.0 and b.updates == 0


def test_a_step_uses_the_baseline_before_updating_it(monkeypatch):
    """Within fdpg_step (the trainer's step, on the toy backend), fdiv_weights receives the value from *earlier*
    batches; the batch's own rewards enter only afterwards (a baseline that depends on its own batch would bias
    the gradient)."""
    seen = []
    real = step_module.fdiv_weights

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["baseline"], out))
        return out

    monkeypatch.setattr(step_module, "fdiv_weights", spy)
    fdpg = toy_demo.ToyFDPG(toy_demo.make_problem(max_len=3), "rkl", batch=64, baseline_momentum=0.5)
    expected_before = 0.0
    for step in range(4):
        info = fdpg.step()
        used, w = seen[-1]
        assert bool((used == expected_before).all()) and expected_before == info["baseline"]   # [b] B(c_i), one context
        stat = MovingAverageBaseline.batch_statistic(w.pseudo_reward, w.importance_ratio)
        expected_before = stat if step == 0 else 0.5 * expected_before + 0.5 * stat
        assert math.isclose(fdpg.state.baseline.value, expected_before, rel_tol=1e-15)
    assert len({float(u[0]) for u, _ in seen}) == 4        # the baseline did move


def test_fdpg_loss():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([2.0, -1.0, 4.0])                     # float32 weights, float64 log-probs
    loss = fdpg_loss(logp, w)
    assert loss.dtype == torch.float64 and math.isclose(float(loss.detach()), (-2.0 + 2.0 - 2.0) / 3, rel_tol=1e-15)
    loss.backward()
    assert torch.equal(logp.grad, w.double() / 3)
    with pytest.raises(ValueError, match="weight must be detached"):
        fdpg_loss(logp, w.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"weight has shape \[2\], expected \[3\]"):
        fdpg_loss(logp, w[:2])
    with pytest.raises(ValueError, match=r"logp_pi must be a vector \[B\]"):
        fdpg_loss(logp[None], w)
