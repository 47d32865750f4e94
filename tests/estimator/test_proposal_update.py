"""The proposal schedule: when it checks, what it estimates (against exact values on the toy), what it
decides, that a training run replaces q exactly when and as designed, and state round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fdpg_scale.toy import demo as toy_demo
from fdpg_scale.core.estimator import ProposalSchedule, proposal_estimates
from fdpg_scale.toy.model import ToyLM, exact_divergence, exact_kl, normalise

K, L = 3, 4


def _lm(seed, scale=1.0):
    return ToyLM(K, L, init_scale=scale, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setting():
    """q = a random LM, p = q·exp(φ) (full support), π_near between q and p, π_far pushed away from p."""
    q = _lm(0)
    seqs = q.all_sequences()
    log_q_all = q.log_prob_all().detach()
    log_P_all = log_q_all + 1.2 * ((seqs == 0) & q.mask(seqs)).sum(1).double() + 0.4
    log_p = normalise(log_P_all)
    near = _lm(9).set_distribution_(normalise(torch.logaddexp(log_p + math.log(0.8), log_q_all + math.log(0.2))))
    far = _lm(9).set_distribution_(normalise(2 * log_q_all - log_p))          # q "reflected" away from p
    x = q.sample(20_000, torch.Generator().manual_seed(1))
    idx = q.sequence_index(x)
    batch = {"logp_q": log_q_all[idx], "log_target": log_P_all[idx]}
    return {"q": q, "near": near, "far": far, "log_p": log_p, "log_P_all": log_P_all, "batch": batch, "idx": idx}


def _exact(metric, model, log_p):
    log_m = model.log_prob_all().detach()
    return float(exact_kl(log_m, log_p) if metric == "kl" else exact_divergence("tv", log_m, log_p))


def test_due_every_interval():
    s = ProposalSchedule(3)
    assert [k for k in range(0, 13) if s.due(k)] == [3, 6, 9, 12]
    assert [k for k in range(0, 4) if ProposalSchedule(1).due(k)] == [1, 2, 3]


@pytest.mark.parametrize("normalised", ["self", "given log Z"])
@pytest.mark.parametrize("metric", ["kl", "tv"])
def test_estimates_match_exact_values(setting, metric, normalised):
    log_z = float(torch.logsumexp(setting["log_P_all"], 0)) if normalised == "given log Z" else None
    for which in ("near", "far"):
        pi = setting[which]
        log_pi = pi.log_prob_all().detach()[setting["idx"]]
        d_pi, d_q = proposal_estimates(metric, logp_pi=log_pi, log_z=log_z, **setting["batch"])
        exact_pi, exact_q = _exact(metric, pi, setting["log_p"]), _exact(metric, setting["q"], setting["log_p"])
        # 20,000 samples: the estimates are within a few percent of the exact values (errors ≪ the gaps).
        assert abs(d_pi - exact_pi) < 0.05 * exact_pi + 0.005, (which, d_pi, exact_pi)
        assert abs(d_q - exact_q) < 0.05 * exact_q + 0.005, (which, d_q, exact_q)


@pytest.mark.parametrize("metric", ["kl", "tv"])
def test_decisions(setting, metric):
    log_p = setting["log_p"]
    assert _exact(metric, setting["near"], log_p) < _exact(metric, setting["q"], log_p) < _exact(
        metric, setting["far"], log_p)
    for which, expected in (("near", True), ("far", False), ("q", False)):   # π = q: not strictly closer
        s = ProposalSchedule(2, metric)
        log_pi = setting[which].log_prob_all().detach()[setting["idx"]]
        assert s.should_replace(logp_pi=log_pi, **setting["batch"]) is expected, which
        assert s.checks == 1 and s.replacements == int(expected)
        assert s.last is not None and all(math.isfinite(v) for v in s.last.values())


def test_no_decision_without_support():
    s = ProposalSchedule(1, "kl")
    z = torch.zeros(4)
    assert s.should_replace(logp_pi=z, logp_q=z, log_target=torch.full((4,), -math.inf)) is False
    assert s.last is None and s.checks == 1 and s.replacements == 0
    assert proposal_estimates("tv", logp_pi=z, logp_q=z, log_target=torch.full((4,), -math.inf)) is None


def test_training_run_replaces_q_exactly_as_designed():
    """Off-policy toy run, interval 3: q changes only after steps 3, 6, 9, 12, only when the schedule said so,
    and then equals π; at least one replacement and one refusal happen."""
    problem = toy_demo.make_problem(max_len=4)
    fdpg = toy_demo.ToyFDPG(problem, "kl", batch=200, lr=0.2, proposal_interval=3, seed=2)
    decisions = []
    for _ in range(24):
        q_before = fdpg.proposal.logits.detach().clone()
        checks_before = fdpg.schedule.checks
        info = fdpg.step()
        changed = not torch.equal(q_before, fdpg.proposal.logits)
        assert changed == info["replaced"]
        assert fdpg.schedule.checks == checks_before + int(fdpg.steps % 3 == 0)
        if fdpg.steps % 3:
            assert not info["replaced"]
        else:
            decisions.append(info["replaced"])
        if info["replaced"]:
            assert torch.equal(fdpg.proposal.logits, fdpg.policy.logits)
    assert fdpg.schedule.checks == 8 and fdpg.proposal_version == sum(decisions) == fdpg.schedule.replacements
    assert any(decisions), decisions


def test_state_dict_round_trip_and_config_wins():
    a = ProposalSchedule(4, "tv")
    a.should_replace(logp_pi=torch.tensor([0.0, -1.0]), logp_q=torch.tensor([-0.5, -0.5]),
                     log_target=torch.tensor([0.0, -2.0]))
    b = ProposalSchedule(2, "kl")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.checks, b.replacements, b.last) == (a.checks, a.replacements, a.last)
    assert (b.interval, b.metric) == (2, "kl")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="interval must be an int ≥ 1"):
        ProposalSchedule(0)
    with pytest.raises(ValueError, match="metric must be one of"):
        ProposalSchedule(1, "js")
    with pytest.raises(ValueError, match=r"logp_q has shape \[2\], expected \[3\]"):
        proposal_estimates("kl", logp_pi=torch.zeros(3), logp_q=torch.zeros(2), log_target=torch.zeros(3))
