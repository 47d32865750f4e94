"""The DeepSpeed ZeRO-3 engines as an ``FDPGBackend``: what ``fdpg_step`` (fdpg_scale.core.step) trains in a run.

Sampling and scoring are ``collect_chunks`` (rollout.py: per-chunk seeds, so 1 and N ranks draw the same
global batch); log π comes from the policy engine's fused head (the lm_head is gathered and its gradient
reduced inside the engine's forward); DeepSpeed averages the micro-batch losses over accumulation steps and
ranks and steps the optimizer at the accumulation boundary, i.e. inside the step's last ``backward``.
"""

from __future__ import annotations

import functools

from typing import Callable

import torch

from fdpg_scale.core.collectives import LocalCollective, TorchDistCollective
from fdpg_scale.core.step import Draws
from fdpg_scale.distributed.engines import copy_policy_into_proposal, sequence_logprobs, train_step
from fdpg_scale.distributed.inference_copy import InferenceCopy
from fdpg_scale.distributed.launch import all_gather_rows, device
from fdpg_scale.distributed.vllm_engine import VllmProposal
from fdpg_scale.targets.tasks import Task
from fdpg_scale.training.prompts import PromptSet
from fdpg_scale.training.sampler import longest_prompt
from fdpg_scale.training.rollout import RolloutPlan, ScoredChunk, collect_chunks
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["ZeroBackend"]


class ZeroBackend:
    """``FDPGBackend`` over the policy, proposal and base engines of one rank.

    Args:
        policy: the trainable DeepSpeed engine (π).
        proposal: the frozen proposal engine (q), or None on-policy.
        base: the frozen base engine (a).
        task: the target and its alignment feature.
        tokenizer: the model directory's tokenizer.
        plan: what this rank's rollouts sample (q's settings, the global batch's layout and seeds, the
            sampling batch, whether log q is rescored): ``RolloutPlan`` (rollout.py).
        prompts: a conditional target's contexts, or None.
        vllm: a vLLM copy of q that samples instead of the ZeRO-3 engine (``sampling.engine: vllm``), kept
            current by pushing q's weights whenever ``q_version()`` (training/sampler.py) has changed; the
            ZeRO-3 engine that is q still rescores log q.
        q_copy: a whole copy of the proposal (``InferenceCopy``, ``train.inference_copies``) that samples and
            rescores instead of its engine; refreshed after each q ← π. ``base`` may be such a copy too.

    ``timer`` holds the current step's seconds per phase (a fresh ``PhaseTimer`` at each ``sample``);
    ``last_samples`` the decoded samples of the last ``sample`` call (this rank's micro-batches in order), for the
    samples table (training/samples_table.py).
    """

    def __init__(self, *, policy, proposal, base, task: Task, tokenizer, plan: RolloutPlan,
                 prompts: PromptSet | None = None, vllm: VllmProposal | None = None,
                 q_version: Callable[[], tuple[str, int]] | None = None, q_copy: InferenceCopy | None = None):
        if not isinstance(plan, RolloutPlan):
            raise TypeError(f"plan must be a RolloutPlan, got {type(plan).__name__}")
        self.policy, self.proposal, self.base = policy, proposal, base
        self.task = task
        self.tokenizer = tokenizer
        self.plan = plan
        self.prompts = prompts
        if vllm is not None and q_version is None:
            raise ValueError("a vLLM sampler needs q_version, to know when q's weights must be pushed")
        self.vllm, self.q_version = vllm, q_version
        if q_copy is not None and (proposal is None or q_copy.engine is not proposal):
            raise ValueError("q_copy must be an InferenceCopy of the proposal engine (none on-policy)")
        self.q_copy = q_copy
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.collective = TorchDistCollective() if distributed else LocalCollective()
        self._device = device()  # the timer synchronises it around each phase when it is a GPU
        self.timer = PhaseTimer(self._device)
        self._stepped = False
        self.last_samples: list = []

    @property
    def sampler(self):
        """The ZeRO-3 engine that is q: the proposal, or π on-policy (it samples unless a vLLM copy does)."""
        return self.policy if self.proposal is None else self.proposal

    def sample(self, step: int) -> list[Draws]:
        """This rank's ``accumulation`` micro-batches of step ``step``, sampled and scored (collective)."""
        self.timer = PhaseTimer(self._device)
        if self.vllm is not None and self.vllm.version != self.q_version():   # q changed: push it (collective)
            with self.timer.phase("refresh"):
                self.vllm.refresh_from(self.sampler, version=self.q_version())
        q = self.sampler if self.q_copy is None else self.q_copy
        chunks = collect_chunks(sampler=q if self.vllm is None else self.vllm, q_engine=q,
                                base=self.base, task=self.task, tokenizer=self.tokenizer, plan=self.plan, step=step,
                                timer=self.timer, prompts=self.prompts)
        self.last_samples = [c.samples for c in chunks]
        return [self._draws(c) for c in chunks]

    @staticmethod
    def _draws(chunk: ScoredChunk) -> Draws:
        return Draws(logq=chunk.logq, log_target=chunk.log_target, log_base=chunk.logp_base.sum(-1),
                     context_ids=chunk.context_ids, features=chunk.features,
                     extras={"tokens": chunk.rollout.gen_mask.sum(-1).float(),
                             "logq_mismatch": chunk.logq_recorded - chunk.logq}, payload=chunk, problem=chunk.problem)

    def policy_logprobs(self, draws: Draws) -> torch.Tensor:
        """[b] log π(x) summed over the generated tokens, with autograd (on the policy's device)."""
        r = draws.payload.rollout
        with self.timer.phase("logprobs"):
            return sequence_logprobs(self.policy, r.input_ids, r.attention_mask, r.gen_mask).sum(-1)

    def sampling_logprobs(self, draws: Draws, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """[b] log of π warped by the sampling temperature, as q would draw if it became π (no grad).

        At temperature 1 that is log π itself (no extra pass). With top-k/top-p the truncation is not applied
        here (the fused head gives temperature-scaled log-probs only): the comparison then uses the
        temperature-warped π, while log q is the truncated sampler's (see docs/method.md §6).
        """
        temperature = self.plan.settings.temperature
        if self.proposal is None or temperature == 1.0:
            return policy_logprobs
        r = draws.payload.rollout
        with self.timer.phase("logprobs"), torch.no_grad():
            return sequence_logprobs(self.policy, r.input_ids, r.attention_mask, r.gen_mask,
                                     temperature=temperature).sum(-1)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed backward of one micro-batch's mean loss, then ``engine.step()`` (a real optimizer step
        only at the accumulation boundary: the last micro-batch of the global batch)."""
        with self.timer.phase("backward"):
            self._stepped = train_step(self.policy, loss)

    def optimizer_step(self) -> None:
        """Nothing left to do: DeepSpeed stepped in the last ``backward``; checked here."""
        if not self._stepped:
            raise RuntimeError("the step's last micro-batch was not at DeepSpeed's accumulation boundary: "
                               "gradient_accumulation_steps disagrees with the number of micro-batches sampled")
        self._stepped = False

    def replace_proposal(self) -> None:
        """q ← π shard by shard (no gather), then q's inference copy if any (a gather); collective."""
        copy_policy_into_proposal(self.policy, self.proposal)
        if self.q_copy is not None:
            self.q_copy.refresh()

    def gather_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global batch's rows on every rank (rank order)."""
        return all_gather_rows(rows)

    @functools.cached_property
    def evidence_width(self) -> int:
        """W, the width of every evidence row: the longest context (BOS alone when unconditional) plus
        max_new_tokens, so that rows of any chunk, step and rank concatenate and gather."""
        return longest_prompt(self.prompts) + self.plan.settings.max_new_tokens

    def evidence_rows(self, draws: Draws) -> dict[str, torch.Tensor]:
        """{input_ids int32, attention_mask bool, gen_mask bool: [b, W]} the micro-batch's rollout, left-padded
        to ``evidence_width`` (positions come from the attention mask, so the padding changes no log-prob)."""
        r = draws.payload.rollout
        extra = self.evidence_width - r.input_ids.shape[1]
        if extra < 0:
            raise RuntimeError(f"a rollout of width {r.input_ids.shape[1]} exceeds the evidence width "
                               f"{self.evidence_width} (longest context + sampling.max_new_tokens)")
        pad = torch.nn.functional.pad
        return {"input_ids": pad(r.input_ids, (extra, 0)).to(torch.int32),
                "attention_mask": pad(r.attention_mask, (extra, 0)).bool(),
                "gen_mask": pad(r.gen_mask, (extra, 0)).bool()}

    @torch.no_grad()
    def rescore_sampling(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N] log π (at the sampling temperature) of the global evidence rows, under the current policy.

        Each rank scores rows [rank·N/world, (rank+1)·N/world) in micro-batches, then the shares are gathered in
        rank order, i.e. the rows' order. N is a multiple of the global batch, so every rank runs the same number
        of forwards (ZeRO-3's gathers are collective).
        """
        n = rows["input_ids"].shape[0]
        if n % self.plan.world:
            raise ValueError(f"{n} evidence rows do not split over {self.plan.world} ranks")
        share = n // self.plan.world
        mine = slice(self.plan.rank * share, (self.plan.rank + 1) * share)
        out = []
        with self.timer.phase("proposal_check"):
            for start in range(mine.start, mine.stop, self.plan.micro_batch):
                stop = min(start + self.plan.micro_batch, mine.stop)
                logp = sequence_logprobs(self.policy, rows["input_ids"][start:stop].long(),
                                         rows["attention_mask"][start:stop].long(), rows["gen_mask"][start:stop],
                                         temperature=self.plan.settings.temperature)
                out.append(logp.sum(-1).float().cpu())
            local = torch.cat(out) if out else torch.zeros(0)
            return all_gather_rows({"logp": local})["logp"]
