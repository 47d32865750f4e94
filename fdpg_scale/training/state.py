"""Everything a run carries from step to step besides the engines, with one ``state_dict`` for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdpg_scale.core.collectives import LocalCollective, TorchDistCollective
from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.core.estimator import MovingAverageBaseline, PerContextLogZ, ProposalSchedule
from fdpg_scale.core.step import FDPGState
from fdpg_scale.training.config import RunConfig

__all__ = ["TrainerState"]


@dataclass(kw_only=True)
class TrainerState(FDPGState):
    """The estimator's state (``FDPGState``: log Z, baseline, proposal schedule) plus the run's own."""

    step: int = 0
    """Optimizer steps completed."""
    lambdas: list[float] | None = None
    """A distributional target's fitted λ (None for the other kinds, or before the fit)."""

    @classmethod
    def fresh(cls, cfg: RunConfig, num_contexts: int = 1) -> "TrainerState":
        """Step 0 state for ``cfg``; the log Z estimate all-reduces over the default process group if any."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        collective = TorchDistCollective() if distributed else LocalCollective()
        t = cfg.train
        schedule = None if t.on_policy else ProposalSchedule(t.proposal_update_interval, t.proposal_update_metric,
                                                             min_samples=t.proposal_min_samples)
        # Forward KL's E_π[r] is 1 for every π: no estimate needed (docs/method.md §4).
        exact = get_divergence(cfg.divergence.name, alpha=cfg.divergence.alpha).exact_baseline
        return cls(log_z=PerContextLogZ(num_contexts, collective=collective),
                   baseline=MovingAverageBaseline(t.baseline_momentum, enabled=t.baseline, num_contexts=num_contexts,
                                                  exact=exact),
                   proposal_schedule=schedule)

    def state_dict(self) -> dict:
        return {"step": self.step, "log_z": self.log_z.state_dict(), "baseline": self.baseline.state_dict(),
                "proposal_schedule": None if self.proposal_schedule is None else self.proposal_schedule.state_dict(),
                "proposal_version": self.proposal_version, "lambdas": self.lambdas}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.log_z.load_state_dict(state["log_z"])
        self.baseline.load_state_dict(state["baseline"])
        if self.proposal_schedule is not None and state["proposal_schedule"] is not None:
            self.proposal_schedule.load_state_dict(state["proposal_schedule"])
        self.proposal_version = int(state["proposal_version"])
        self.lambdas = None if state["lambdas"] is None else [float(v) for v in state["lambdas"]]
