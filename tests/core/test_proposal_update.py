"""The proposal schedule: when it checks, what it estimates (against exact values on the toy), what it
decides, that it decides only on enough accumulated samples, that a training run (fdpg_step on the toy backend)
replaces q exactly when and as designed and rarely by a worse policy, and state round trips."""

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


def test_due_every_interval_once_enough_samples():
    s = ProposalSchedule(3, min_samples=1)
    assert [k for k in range(0, 13) if s.due(k)] == []                      # nothing observed yet
    z = torch.zeros(1)
    s.observe(logp_pi=z, logp_q=z, log_target=z)
    assert [k for k in range(0, 13) if s.due(k)] == [3, 6, 9, 12]
    one = ProposalSchedule(1, min_samples=1)
    one.observe(logp_pi=z, logp_q=z, log_target=z)
    assert [k for k in range(0, 4) if one.due(k)] == [1, 2, 3]


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
        s = ProposalSchedule(2, metric, min_samples=1)
        log_pi = setting[which].log_prob_all().detach()[setting["idx"]]
        s.observe(logp_pi=log_pi, **setting["batch"])
        assert s.due(2) and s.decide() is expected, which
        assert s.checks == 1 and s.replacements == int(expected)
        assert s.last is not None and all(math.isfinite(v) for v in s.last.values())


def test_no_decision_without_support():
    s = ProposalSchedule(1, "kl", min_samples=4)
    z = torch.zeros(4)
    s.observe(logp_pi=z, logp_q=z, log_target=torch.full((4,), -math.inf))
    assert s.due(1) and s.decide() is False
    assert s.last is None and s.checks == 1 and s.replacements == 0
    assert proposal_estimates("tv", logp_pi=z, logp_q=z, log_target=torch.full((4,), -math.inf)) is None


def test_decides_only_on_enough_accumulated_samples():
    s = ProposalSchedule(2, "kl", min_samples=10)
    z = torch.zeros(4)
    for step in (1, 2, 3):
        s.observe(logp_pi=z, logp_q=z, log_target=z)
        assert not s.due(step)                                             # 4, 8 < 10; step 3 not a multiple
    assert s.pending == 12 and s.due(4) and not s.due(5)
    s.decide()
    assert s.pending == 0 and not s.due(4) and s.checks == 1               # evidence cleared by a decision


def test_conditional_decision_uses_each_context_log_z():
    """Samples of a context without an estimate (log Z(c) = −inf: all its P = 0) weigh 0, not NaN."""
    s = ProposalSchedule(1, "kl", min_samples=1)
    s.observe(logp_pi=torch.tensor([-1.0, -3.0, -2.0]), logp_q=torch.tensor([-2.0, -2.0, -2.0]),
              log_target=torch.tensor([-1.5, -math.inf, -math.inf]), context_ids=torch.tensor([0, 1, 1]))
    assert s.decide(torch.tensor([-0.5, -math.inf], dtype=torch.float64)) is True
    assert all(math.isfinite(v) for v in s.last.values())


def test_training_run_replaces_q_exactly_as_designed():
    """Off-policy toy run through fdpg_step, interval 3, 200 samples per step, min_samples 700: a decision at
    steps 6, 12, 18, 24 only (600 samples at a check in between are not enough); q changes only then, only
    when the schedule said so, and then equals π; at least one replacement happens."""
    problem = toy_demo.make_problem(max_len=4)
    fdpg = toy_demo.ToyFDPG(problem, "kl", batch=200, lr=0.2, proposal_interval=3, proposal_min_samples=700, seed=2)
    schedule = fdpg.state.proposal_schedule
    decisions = []
    for _ in range(24):
        q_before = fdpg.proposal.logits.detach().clone()
        checks_before = schedule.checks
        info = fdpg.step()
        changed = not torch.equal(q_before, fdpg.proposal.logits)
        assert changed == info["replaced"]
        decided = fdpg.steps % 6 == 0
        assert schedule.checks == checks_before + int(decided)
        if decided:
            decisions.append(info["replaced"])
            assert schedule.last["samples"] == 1200
        else:
            assert not info["replaced"]
        if info["replaced"]:
            assert torch.equal(fdpg.proposal.logits, fdpg.policy.logits)
    assert schedule.checks == 4 and fdpg.proposal_version == sum(decisions) == schedule.replacements
    assert any(decisions), decisions


def _wrong_replacements(min_samples: int, seeds: range, steps: int = 60) -> tuple[int, int, int]:
    """(wrong, replacements, decisions) over toy runs through fdpg_step on a pointwise target, interval 1,
    batch 32: a replacement is wrong when the new q (= π) is farther from p in exact KL(p‖·) than the old q."""
    wrong = total = decisions = 0
    for seed in seeds:
        problem = toy_demo.make_problem("pointwise", max_len=4, seed=seed)
        fdpg = toy_demo.ToyFDPG(problem, "kl", batch=32, lr=0.1, proposal_interval=1,
                                proposal_min_samples=min_samples, seed=seed)
        replace = fdpg.backend.replace_proposal

        def judged_replace():
            nonlocal wrong, total
            log_p = problem.log_p
            new = float(exact_kl(fdpg.policy.log_prob_all().detach(), log_p))
            old = float(exact_kl(fdpg.proposal.log_prob_all().detach(), log_p))
            wrong, total = wrong + int(new > old), total + 1
            replace()

        fdpg.backend.replace_proposal = judged_replace
        for _ in range(steps):
            fdpg.step()
        decisions += fdpg.state.proposal_schedule.checks
    return wrong, total, decisions


@pytest.mark.slow
def test_accumulated_evidence_rarely_replaces_q_by_a_worse_policy():
    """Interval 1, batch 32, decisions on ≥ 256 samples of π before its update (out of sample): q is replaced
    regularly and almost never by a worse π (measured: 0 wrong of 28 on 4 seeds; 3 of 240 decisions when
    deciding on every batch of 32)."""
    with toy_demo.single_thread():
        wrong, replacements, decisions = _wrong_replacements(256, range(3))
    assert decisions == 3 * (60 * 32 // 256)                  # one decision per 256 samples, no more
    assert replacements >= decisions // 2, (replacements, decisions)
    assert wrong <= max(1, replacements // 10), (wrong, replacements)


def test_state_dict_round_trip_and_config_wins():
    a = ProposalSchedule(4, "tv", min_samples=2)
    a.observe(logp_pi=torch.tensor([0.0, -1.0]), logp_q=torch.tensor([-0.5, -0.5]),
              log_target=torch.tensor([0.0, -2.0]))
    a.decide()
    a.observe(logp_pi=torch.tensor([-0.3]), logp_q=torch.tensor([-0.5]), log_target=torch.tensor([-1.0]))
    b = ProposalSchedule(2, "kl", min_samples=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.checks, b.replacements, b.last, b.pending) == (a.checks, a.replacements, a.last, 1)
    assert (b.interval, b.metric, b.min_samples) == (2, "kl", 5)
    assert b.state_dict()["evidence"] == a.state_dict()["evidence"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="interval must be an int ≥ 1"):
        ProposalSchedule(0)
    with pytest.raises(ValueError, match="metric must be one of"):
        ProposalSchedule(1, "js")
    with pytest.raises(ValueError, match="min_samples must be an int ≥ 1"):
        ProposalSchedule(1, min_samples=0)
    with pytest.raises(ValueError, match=r"logp_q has shape \[2\], expected \[3\]"):
        proposal_estimates("kl", logp_pi=torch.zeros(3), logp_q=torch.zeros(2), log_target=torch.zeros(3))
