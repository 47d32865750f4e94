"""One optimizer step's samples on this rank: sampled from q, then scored by the base model and the target.

The global batch of a step is cut into *chunks* of ``micro_batch`` sequences, numbered 0 … G−1 across all
ranks (chunk ``c`` lives on rank ``c mod world``, micro-step ``c div world``). Chunk ``c`` is sampled with a
seed derived from (run seed, step, c) only, so the same run config draws the same global batch whatever the
world size: that is what makes 1 rank and N ranks comparable, and a resumed run draw exactly what the
uninterrupted one would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fdpg_scale.distributed.engines import sequence_logprobs
from fdpg_scale.distributed.generation import Rollout, SamplingSettings, sample
from fdpg_scale.distributed.vllm_engine import VllmProposal
from fdpg_scale.training.prompts import PromptSet
from fdpg_scale.targets.samples import Samples
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["ScoredChunk", "chunk_seed", "collect_chunks", "TRAIN_STREAM", "FIT_STREAM"]

TRAIN_STREAM = 0
"""Seed stream of the training batches."""
FIT_STREAM = 1
"""Seed stream of the draws that fit a distributional target's λ before training."""


@dataclass
class ScoredChunk:
    """A micro-batch of sampled sequences with every score f-DPG needs (all CPU tensors, B = micro_batch)."""

    rollout: Rollout
    """input_ids / attention_mask / gen_mask [B, T] and the proposal's per-token log q [B, T]."""
    samples: Samples
    """What the scorers see: generated token ids and decoded texts."""
    logp_base: torch.Tensor
    """[B, T] per-token log a(x_t | x_<t) of the base model, 0 off ``gen_mask``."""
    log_scores: torch.Tensor
    """[B] Σ of the target's scorers' log-scores (−inf where a pointwise constraint fails)."""
    feature: torch.Tensor
    """[B] the task's alignment feature φ(x) (b(x) for a pointwise constraint, r(x) for a reward)."""

    @property
    def context_ids(self) -> torch.Tensor:
        """[B] int64: the context (prompt) each sample continues; 0 for unconditional targets."""
        return self.samples.context_ids

    @property
    def logq(self) -> torch.Tensor:
        """[B] log q(x) (the warped proposal distribution that actually drew x)."""
        return self.rollout.logprobs.sum(-1)

    @property
    def log_target(self) -> torch.Tensor:
        """[B] log P(x) = log a(x) + Σ log-scores (unnormalised)."""
        return self.logp_base.sum(-1) + self.log_scores


def chunk_seed(run_seed: int, step: int, chunk: int, stream: int = TRAIN_STREAM) -> int:
    """A 63-bit seed for sampling chunk ``chunk`` of step ``step``: independent of rank and world size."""
    return int(np.random.SeedSequence([run_seed, stream, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def collect_chunks(*, sampler, base, task, tokenizer, settings: SamplingSettings, mode: str, run_seed: int,
                   step: int, rank: int, world: int, accumulation: int, micro_batch: int, timer: PhaseTimer,
                   prompts: PromptSet | None = None, stream: int = TRAIN_STREAM) -> list[ScoredChunk]:
    """Sample and score this rank's ``accumulation`` chunks of step ``step`` (collective: all ranks call).

    sampler: the engine q is drawn from (the proposal engine, or the policy on-policy, or a ``VllmProposal``
    holding q's weights: training/sampler.py); base: the frozen base
    engine a; task: a ``fdpg_scale.targets.tasks.Task``; timer: receives the "generation" and "scoring" seconds.
    prompts: a conditional target's contexts (each row continues one drawn with the chunk's seed), or None
    for unconditional generation (from BOS; every sample is context 0).
    """
    chunks = []
    for micro in range(accumulation):
        chunk = micro * world + rank
        seed = chunk_seed(run_seed, step, chunk, stream)
        if prompts is None:
            context_ids, chunk_prompts, contexts = torch.zeros(micro_batch, dtype=torch.long), [[]] * micro_batch, None
        else:
            context_ids = torch.as_tensor(prompts.draw(micro_batch, seed), dtype=torch.long)
            chunk_prompts = [list(prompts.token_ids[c]) for c in context_ids.tolist()]
            contexts = [prompts.texts[c] for c in context_ids.tolist()]
        with timer.phase("generation"):
            if isinstance(sampler, VllmProposal):  # sampling.engine: vllm (mode is the hf path's)
                rollout = sampler.sample(chunk_prompts, settings, seed=seed, bos_id=tokenizer.bos_token_id,
                                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
            else:
                rollout = sample(sampler, chunk_prompts, settings, seed=seed,
                                 bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                                 pad_id=tokenizer.pad_token_id, mode=mode)
        generated = rollout.input_ids[:, rollout.prompt_len:]
        gen_mask = rollout.gen_mask[:, rollout.prompt_len:]
        texts = tokenizer.batch_decode(generated.masked_fill(~gen_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        samples = Samples(token_ids=generated, mask=gen_mask, texts=texts, context_ids=context_ids, contexts=contexts)
        with timer.phase("scoring"), torch.no_grad():
            logp_base = sequence_logprobs(base, rollout.input_ids, rollout.attention_mask, rollout.gen_mask).cpu()
            chunks.append(ScoredChunk(rollout=rollout, samples=samples, logp_base=logp_base,
                                      log_scores=task.target.log_scores(samples), feature=task.feature(samples)))
    return chunks
