"""The enumerable toy as an ``FDPGBackend``: ``fdpg_step`` (fdpg_scale.core.step) runs on it unchanged.

The policy π and the proposal q are ``ToyLM``s; the target is a table of log P over every sequence, so a sample
is scored by looking its index up. One process, one micro-batch per step, Adam (or any torch optimizer).

``enumerate_all=True`` makes ``sample`` return every sequence once instead of drawing: with a proposal that is
uniform over the N sequences, that *is* the exact expectation E_q[·] = (1/N) Σ_x [·], and the running Ẑ after
one step is exactly Z = Σ_x P(x). The tests use it to prove the step's expected gradient equal to ∇D_f exactly.
"""

from __future__ import annotations

import torch

from fdpg_scale.core.collectives import LocalCollective
from fdpg_scale.core.step import Draws
from fdpg_scale.toy.model import ToyLM

__all__ = ["ToyBackend"]


class ToyBackend:
    """``FDPGBackend`` over tabular LMs.

    Args:
        policy: π (trained by ``optimizer``).
        proposal: q, or None on-policy (samples come from π).
        log_target: [N] log P over ``policy.all_sequences()`` (−inf outside the support).
        log_base: [N] log a over the same sequences.
        optimizer: steps π's parameters.
        batch: samples per step (ignored with ``enumerate_all``).
        generator: the sampling RNG.
        features: {name: [N]} per-sequence features whose E_π is reported (optional).
        enumerate_all: return every sequence once per step (exact expectations; see the module docstring).
    """

    def __init__(self, *, policy: ToyLM, proposal: ToyLM | None, log_target: torch.Tensor, log_base: torch.Tensor,
                 optimizer: torch.optim.Optimizer, batch: int, generator: torch.Generator,
                 features: dict[str, torch.Tensor] | None = None, enumerate_all: bool = False):
        n = policy.num_sequences
        for name, table in (("log_target", log_target), ("log_base", log_base), *(features or {}).items()):
            if table.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}] (one value per sequence), got {list(table.shape)}")
        if batch < 1:
            raise ValueError(f"batch must be ≥ 1, got {batch}")
        self.policy, self.proposal = policy, proposal
        self.log_target, self.log_base = log_target, log_base
        self.optimizer = optimizer
        self.batch = batch
        self.generator = generator
        self.features = dict(features or {})
        self.enumerate_all = enumerate_all
        self.collective = LocalCollective()

    @property
    def sampler(self) -> ToyLM:
        """The LM samples are drawn from: q, or π on-policy."""
        return self.policy if self.proposal is None else self.proposal

    def sample(self, step: int) -> list[Draws]:
        """One micro-batch: ``batch`` draws from the sampler (or every sequence once), scored by table look-up."""
        q = self.sampler
        seqs = q.all_sequences() if self.enumerate_all else q.sample(self.batch, self.generator)
        with torch.no_grad():
            logq = q.log_prob(seqs)
        idx = q.sequence_index(seqs)
        return [Draws(logq=logq, log_target=self.log_target[idx], log_base=self.log_base[idx],
                      context_ids=torch.zeros(len(idx), dtype=torch.long),
                      features={k: v[idx] for k, v in self.features.items()}, payload=seqs)]

    def policy_logprobs(self, draws: Draws) -> torch.Tensor:
        """[b] log π(x) with autograd."""
        return self.policy.log_prob(draws.payload)

    def sampling_logprobs(self, draws: Draws, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """The toy samples without warping: π as a proposal is π itself."""
        return policy_logprobs

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def replace_proposal(self) -> None:
        if self.proposal is None:
            raise RuntimeError("on-policy: there is no proposal to replace")
        self.proposal.copy_(self.policy)

    def gather_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One process: this rank's rows are the global batch."""
        return rows

    def evidence_rows(self, draws: Draws) -> dict[str, torch.Tensor]:
        """{"sequence": [b, L]} the sampled sequences themselves (all of one length in the toy)."""
        return {"sequence": draws.payload}

    @torch.no_grad()
    def rescore_sampling(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N] log π of the rows' sequences under the current policy (no warping in the toy)."""
        return self.policy.log_prob(rows["sequence"])
