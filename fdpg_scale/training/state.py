"""Everything a run carries from step to step besides the engines, with one ``state_dict`` for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdpg_scale.core.collectives import LocalCollective, TorchDistCollective
from fdpg_scale.training.config import RunConfig
from fdpg_scale.core.estimator import MovingAverageBaseline, PerContextLogZ, ProposalSchedule

__all__ = ["TrainerState"]


@dataclass
class TrainerState:
    step: int
    """Optimizer steps completed."""
    log_z: PerContextLogZ
    """Running log Z(c) per context over every sample so far (all ranks); one context when unconditional."""
    baseline: MovingAverageBaseline
    proposal_schedule: ProposalSchedule
    proposal_version: int = 0
    """How many times q was replaced by π."""
    lambdas: list[float] | None = None
    """A distributional target's fitted λ (None for the other kinds, or before the fit)."""

    @classmethod
    def fresh(cls, cfg: RunConfig, num_contexts: int = 1) -> "TrainerState":
        """Step 0 state for ``cfg``; the log Z estimate all-reduces over the default process group if any."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        collective = TorchDistCollective() if distributed else LocalCollective()
        return cls(step=0, log_z=PerContextLogZ(num_contexts, collective=collective),
                   baseline=MovingAverageBaseline(cfg.train.baseline_momentum, enabled=cfg.train.baseline),
                   proposal_schedule=ProposalSchedule(cfg.train.proposal_update_interval,
                                                      cfg.train.proposal_update_metric))

    def state_dict(self) -> dict:
        return {"step": self.step, "log_z": self.log_z.state_dict(), "baseline": self.baseline.state_dict(),
                "proposal_schedule": self.proposal_schedule.state_dict(),
                "proposal_version": self.proposal_version, "lambdas": self.lambdas}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.log_z.load_state_dict(state["log_z"])
        self.baseline.load_state_dict(state["baseline"])
        self.proposal_schedule.load_state_dict(state["proposal_schedule"])
        self.proposal_version = int(state["proposal_version"])
        self.lambdas = None if state["lambdas"] is None else [float(v) for v in state["lambdas"]]
