"""The DeepSpeed ZeRO-3 engines as an ``FDPGBackend``: what ``fdpg_step`` (fdpg_scale.core.step) trains in a run.

Sampling and scoring are ``collect_chunks`` (rollout.py: per-chunk seeds, so 1 and N ranks draw the same
global batch); log π comes from the policy engine's fused head (the lm_head is gathered and its gradient
reduced inside the engine's forward); DeepSpeed averages the micro-batch losses over accumulation steps and
ranks and steps the optimizer at the accumulation boundary, i.e. inside the step's last ``backward``.
"""

from __future__ import annotations

from typing import Callable

import torch

from fdpg_scale.core.collectives import LocalCollective, TorchDistCollective
from fdpg_scale.core.step import Draws
from fdpg_scale.distributed.engines import copy_policy_into_proposal, sequence_logprobs, train_step
from fdpg_scale.distributed.generation import SamplingSettings
from fdpg_scale.distributed.launch import all_gather_rows, device
from fdpg_scale.distributed.vllm_engine import VllmProposal
from fdpg_scale.targets.tasks import Task
from fdpg_scale.training.prompts import PromptSet
from fdpg_scale.training.rollout import ScoredChunk, collect_chunks
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
        settings: how q samples (temperature, top-k/top-p, max_new_tokens).
        mode: ``gathered`` or ``sharded`` generation.
        run_seed, rank, world, accumulation, micro_batch: the global batch's layout and seeds.
        prompts: a conditional target's contexts, or None.
        sampling_batch: sequences per generate call (None: ``micro_batch``); rescore_logq: recompute log q with
            the sampler's fused forward (rollout.py).
        vllm: a vLLM copy of q that samples instead of the ZeRO-3 engine (``sampling.engine: vllm``), kept
            current by pushing q's weights whenever ``q_version()`` (training/sampler.py) has changed; the
            ZeRO-3 engine that is q still rescores log q.

    ``timer`` holds the current step's seconds per phase (a fresh ``PhaseTimer`` at each ``sample``).
    """

    def __init__(self, *, policy, proposal, base, task: Task, tokenizer, settings: SamplingSettings, mode: str,
                 run_seed: int, rank: int, world: int, accumulation: int, micro_batch: int,
                 prompts: PromptSet | None = None, sampling_batch: int | None = None, rescore_logq: bool = True,
                 vllm: VllmProposal | None = None, q_version: Callable[[], tuple[str, int]] | None = None):
        self.policy, self.proposal, self.base = policy, proposal, base
        self.task = task
        self.tokenizer = tokenizer
        self.settings = settings
        self.mode = mode
        self.run_seed, self.rank, self.world = run_seed, rank, world
        self.accumulation, self.micro_batch = accumulation, micro_batch
        self.prompts = prompts
        self.sampling_batch, self.rescore_logq = sampling_batch, rescore_logq
        if vllm is not None and q_version is None:
            raise ValueError("a vLLM sampler needs q_version, to know when q's weights must be pushed")
        self.vllm, self.q_version = vllm, q_version
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.collective = TorchDistCollective() if distributed else LocalCollective()
        self._device = device()  # the timer synchronises it around each phase when it is a GPU
        self.timer = PhaseTimer(self._device)
        self._stepped = False

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
        chunks = collect_chunks(sampler=self.sampler if self.vllm is None else self.vllm, q_engine=self.sampler,
                                base=self.base, task=self.task, tokenizer=self.tokenizer,
                                settings=self.settings, mode=self.mode, run_seed=self.run_seed, step=step,
                                rank=self.rank, world=self.world, accumulation=self.accumulation,
                                micro_batch=self.micro_batch, timer=self.timer, prompts=self.prompts,
                                sampling_batch=self.sampling_batch, rescore_logq=self.rescore_logq)
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
        if self.proposal is None or self.settings.temperature == 1.0:
            return policy_logprobs
        r = draws.payload.rollout
        with self.timer.phase("logprobs"), torch.no_grad():
            return sequence_logprobs(self.policy, r.input_ids, r.attention_mask, r.gen_mask,
                                     temperature=self.settings.temperature).sum(-1)

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
        """q ← π shard by shard (no gather); collective."""
        copy_policy_into_proposal(self.policy, self.proposal)

    def gather_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global batch's rows on every rank (rank order)."""
        return all_gather_rows(rows)
