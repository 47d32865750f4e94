"""How often a proposal decision is right: the recorded-π rule against the current-π rule, on the enumerable toy.

At a proposal check the trainer asks "is π closer to p than q is?" and replaces q by π if so. The right answer
is the sign of KL(p‖q) − KL(p‖π_now), where π_now is the policy a replacement would copy; on the toy both are
exact (every sequence enumerated). Two importance-sampled rules answer it from the samples drawn from q since
the last check (``ProposalSchedule``):

- **recorded**: each sample's log π as recorded when it was drawn, i.e. under up to ``min_samples / batch``
  older policies;
- **current**: the same samples rescored under π_now (what ``fdpg_step`` does: ``FDPGBackend.rescore_sampling``).

``agreement_rates`` runs the real ``fdpg_step`` on the toy backend (``ToyFDPG``) and, at every check, records
both rules' answers and the exact one. The decision actually taken is the current rule's, so both rules are
judged on the same sequence of (q, π_now, samples). docs/method.md §6 quotes the rates
(``fdpg-scale toy --proposal-rules``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpg_scale.core.estimator import ProposalSchedule, proposal_estimates
from fdpg_scale.toy.demo import ToyFDPG, make_problem, single_thread
from fdpg_scale.toy.model import exact_kl

__all__ = ["Check", "RecordingSchedule", "agreement_rates", "AGREEMENT_SETTINGS"]


@dataclass(frozen=True)
class Check:
    """One proposal check: the exact answer and each rule's."""

    exact: bool
    """KL(p‖π_now) < KL(p‖q), exactly."""
    recorded: bool | None
    """The recorded-π rule's answer (None: no sample with P > 0, no decision)."""
    current: bool | None
    """The current-π rule's answer."""
    gap: float
    """KL(p‖q) − KL(p‖π_now), exact (how hard the decision is)."""


class RecordingSchedule(ProposalSchedule):
    """A ``ProposalSchedule`` that, at each decision, also evaluates the recorded-π rule and the exact answer.

    ``exact_gap()`` returns KL(p‖q) − KL(p‖π_now) from the toy's enumeration at the moment of the decision.
    """

    def __init__(self, *args, exact_gap, **kwargs):
        super().__init__(*args, **kwargs)
        self._exact_gap = exact_gap
        self.history: list[Check] = []

    def decide(self, log_z: torch.Tensor | None = None, logp_pi: torch.Tensor | None = None) -> bool:
        ev = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._evidence.items() if k != "context_ids"}
        old = proposal_estimates(self.metric, logp_pi=ev["logp_pi"], logp_q=ev["logp_q"], log_target=ev["log_target"])
        gap = self._exact_gap()
        decision = super().decide(log_z, logp_pi)
        current = None if self.last is None else decision
        self.history.append(Check(exact=gap > 0, recorded=None if old is None else old[0] < old[1], current=current,
                                  gap=gap))
        return decision


AGREEMENT_SETTINGS = {"kind": "pointwise", "vocab_size": 3, "max_len": 5, "batch": 32, "lr": 0.1,
                      "proposal_interval": 1, "proposal_min_samples": 256, "steps": 400,
                      "divergences": ("kl", "js", "tv"), "seeds": (0, 1, 2, 3, 4)}
"""The study's fixed settings: the demo's shape (32 samples a step, a check once 256 samples are pending, i.e.
every 8 steps, so the recorded log π spans 8 policies) on the pointwise toy."""


def agreement_rates(settings: dict = AGREEMENT_SETTINGS) -> dict:
    """Run every (divergence, seed) of ``settings`` and count agreements with the exact answer.

    Returns {"checks": n, "recorded": rate, "current": rate, "both_right", "only_current", "only_recorded",
    "per_divergence": {name: {"checks", "recorded", "current"}}}; a rule that gave no answer at a check counts
    as wrong there.
    """
    per_divergence = {}
    everything: list[Check] = []
    with single_thread():
        for name in settings["divergences"]:
            checks: list[Check] = []
            for seed in settings["seeds"]:
                checks += _run(name, seed, settings)
            per_divergence[name] = {"checks": len(checks), **_rates(checks)}
            everything += checks
    both = sum(c.recorded == c.exact and c.current == c.exact for c in everything)
    only_current = sum(c.recorded != c.exact and c.current == c.exact for c in everything)
    only_recorded = sum(c.recorded == c.exact and c.current != c.exact for c in everything)
    return {"checks": len(everything), **_rates(everything), "both_right": both, "only_current": only_current,
            "only_recorded": only_recorded, "per_divergence": per_divergence}


def _rates(checks: list[Check]) -> dict:
    n = max(len(checks), 1)
    return {"recorded": sum(c.recorded == c.exact for c in checks) / n,
            "current": sum(c.current == c.exact for c in checks) / n}


def _run(divergence: str, seed: int, settings: dict) -> list[Check]:
    problem = make_problem(settings["kind"], vocab_size=settings["vocab_size"], max_len=settings["max_len"],
                           seed=seed)
    fdpg = ToyFDPG(problem, divergence, batch=settings["batch"], lr=settings["lr"], seed=seed,
                   proposal_interval=settings["proposal_interval"],
                   proposal_min_samples=settings["proposal_min_samples"])
    log_p = problem.log_p

    @torch.no_grad()
    def gap() -> float:
        kl_q = float(exact_kl(fdpg.proposal.log_prob_all(), log_p))
        kl_pi = float(exact_kl(fdpg.policy.log_prob_all(), log_p))
        return kl_q - kl_pi if math.isfinite(kl_q - kl_pi) else 0.0

    old = fdpg.state.proposal_schedule
    fdpg.state.proposal_schedule = RecordingSchedule(old.interval, old.metric, min_samples=old.min_samples,
                                                     exact_gap=gap)
    for _ in range(settings["steps"]):
        fdpg.step()
    return fdpg.state.proposal_schedule.history
