"""One optimizer step's samples on this rank: sampled from q, then scored by the base model and the target.

Sampling. The global batch of a step is cut into *sampling chunks* of S = ``sampling.batch`` sequences
(default ``train.micro_batch``), numbered 0 … G/S−1 across all ranks (chunk ``c`` lives on rank ``c mod
world``). Chunk ``c`` is sampled with a seed derived from (run seed, step, c) only, so the same run config
draws the same global batch whatever the world size: that is what makes 1 rank and N ranks comparable, and
a resumed run draw exactly what the uninterrupted one would have drawn. A rank samples all its chunks in one
rollout (``sample_batches``: in gathered mode the model is gathered once per step), one ``generate`` call of
S sequences per chunk; S is the generation batch size, larger than the training micro-batch when memory
allows (a generate call is memory-light and much faster per sequence in big batches).

Scoring, per micro-batch of ``train.micro_batch`` sequences (each sampling chunk splits into S/micro_batch
of them): the base model's per-token log a; the target's log-scores; and log q. log q is **rescored** by
default (``rescore_logq``): the proposal engine's fused forward (the same ``linear_token_logprobs`` with fp32
accumulation that computes log π) recomputes log softmax(z/T)[x_t] for the sampled tokens. What generate
recorded comes from a separate lm_head matmul in the model's dtype (bf16 logits are rounded by 0.02–0.06 at
magnitudes 10–30, so over 128 tokens π/q would carry 0.1–0.5 nat of noise even when π = q); the rescored log q
is the same function of the weights as log π. That is exact for temperature-only sampling. With top-k/top-p
the sampled distribution is truncated and renormalised, which the fused head does not model: the recorded,
warped log q is kept (``logq_source`` says which applies). Either way each chunk keeps what generate
recorded, and ``logq_mismatch_metrics`` reports recorded − rescored per sequence.

Rescoring is skipped where it would recompute the same numbers (``RolloutPlan.recorded_logq_exact``): fp32
weights on the CPU with the Hugging Face engine (not vLLM, whose own kernels record log q), where generate's lm_head is an fp32 matmul followed by an fp32 log-softmax, as the fused
head's CPU path (the chunked torch reference) is. The two agree within 1e-5 per sequence there
(tests/distributed/test_zero3.py), and the skipped forward is a third of the step's scoring. On a GPU the
fused head runs Triton tiles (TF32 dot products) and bf16 rounds the logits, so log q is rescored there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from fdpg_scale.distributed.engines import sequence_logprobs
from fdpg_scale.distributed.launch import device
from fdpg_scale.distributed.generation import MODES, Rollout, SamplingSettings, sample_batches
from fdpg_scale.models.tokens import padding_id, start_id
from fdpg_scale.distributed.vllm_engine import VllmProposal
from fdpg_scale.training.prompts import PromptSet
from fdpg_scale.targets.energy import NonFiniteScoreError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["RolloutPlan", "ScoredChunk", "chunk_seed", "collect_chunks", "sampling_layout", "logq_source",
           "describe_logq_source", "logq_mismatch_metrics", "TRAIN_STREAM", "FIT_STREAM"]

TRAIN_STREAM = 0
"""Seed stream of the training batches."""
FIT_STREAM = 1
"""Seed stream of the draws that fit a distributional target's λ before training."""


@dataclass(frozen=True, kw_only=True)
class RolloutPlan:
    """What one rank's rollouts sample, fixed for a run: the settings of q, the global batch's layout on this
    rank and the seeds (everything but the engines, the task, the tokenizer and the prompts)."""

    settings: SamplingSettings
    """How q samples (temperature, top-k/top-p, max_new_tokens): ``cfg.sampling.sampling_settings()``."""
    mode: str = "gathered"
    """``gathered`` or ``sharded`` generation on a ZeRO-3 engine (``sampling.generation_mode``)."""
    run_seed: int
    """The run's ``seed``: with the step, the chunk and the stream it fixes each chunk's draw."""
    rank: int = 0
    world: int = 1
    accumulation: int
    """Micro-batches per optimizer step on each rank."""
    micro_batch: int
    """Sequences per micro-batch (``train.micro_batch``)."""
    sampling_batch: int | None = None
    """Sequences per generate call (``sampling.batch``; None: ``micro_batch``); module docstring."""
    rescore_logq: bool = True
    """Rescore log q with q's fused forward where that is exact (``sampling.rescore_logq``; module docstring)."""
    stream: int = TRAIN_STREAM
    """Seed stream: ``TRAIN_STREAM`` for the training batches, ``FIT_STREAM`` for the λ fit's draws."""
    recorded_logq_exact: bool = False
    """True when generate's recorded log q already equals the fused forward's (fp32 weights on the CPU: module
    docstring), so ``rescore_logq`` has nothing to correct and the rescoring forward is skipped."""

    def __post_init__(self):
        if not isinstance(self.settings, SamplingSettings):
            raise TypeError(f"settings must be a SamplingSettings, got {type(self.settings).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}), got {self.rank}")
        for name in ("accumulation", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.layout()   # raises ValueError naming sampling.batch when it does not split this rank's share

    @classmethod
    def from_config(cls, cfg, *, rank: int, world: int) -> RolloutPlan:
        """The training rollouts of run config ``cfg`` (a ``RunConfig``) on rank ``rank`` of ``world``."""
        return cls(settings=cfg.sampling.sampling_settings(), mode=cfg.sampling.generation_mode, run_seed=cfg.seed,
                   rank=rank, world=world, accumulation=cfg.train.accumulation_steps(world),
                   micro_batch=cfg.train.micro_batch, sampling_batch=cfg.sampling.batch,
                   rescore_logq=cfg.sampling.rescore_logq,
                   # generate's numerics only: vLLM records log q with its own kernels (≈1e-3 apart), so rescore
                   recorded_logq_exact=(cfg.model.dtype == "fp32" and device().type == "cpu"
                                        and cfg.sampling.engine != "vllm"))

    @property
    def sequences(self) -> int:
        """Sequences this rank samples per step: accumulation · micro_batch."""
        return self.accumulation * self.micro_batch

    def layout(self) -> list[int]:
        """This rank's sampling chunks (global chunk numbers): ``sampling_layout``."""
        return sampling_layout(rank=self.rank, world=self.world, accumulation=self.accumulation,
                               micro_batch=self.micro_batch, sampling_batch=self.sampling_batch)


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
    features: dict[str, torch.Tensor]
    """scorer name -> [B] the quantity whose mean under π reports that scorer's alignment (b(x) for a
    pointwise constraint, r(x) for a reward, φ(x) for a feature): ``Task.features``."""
    logq_recorded: torch.Tensor
    """[B] log q(x) as generate recorded it; equals ``logq`` unless log q was rescored (module docstring)."""
    problem: str | None = None
    """Why ``log_scores`` is NaN (a scorer gave NaN or ±inf), for the non-finite guard's message; else None."""

    @property
    def context_ids(self) -> torch.Tensor:
        """[B] int64: the context (prompt) each sample continues; 0 for unconditional targets."""
        return self.samples.context_ids

    @property
    def logq(self) -> torch.Tensor:
        """[B] log q(x) (the warped proposal distribution that actually drew x), the value f-DPG uses."""
        return self.rollout.logprobs.sum(-1)

    @property
    def log_target(self) -> torch.Tensor:
        """[B] log P(x) = log a(x) + Σ log-scores (unnormalised)."""
        return self.logp_base.sum(-1) + self.log_scores


def chunk_seed(run_seed: int, step: int, chunk: int, stream: int = TRAIN_STREAM) -> int:
    """A 63-bit seed for sampling chunk ``chunk`` of step ``step``: independent of rank and world size."""
    return int(np.random.SeedSequence([run_seed, stream, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def logq_source(settings: SamplingSettings, rescore_logq: bool, recorded_exact: bool = False) -> str:
    """Where log q comes from for these settings: ``"rescored"`` or ``"recorded"`` (see module docstring).
    recorded_exact: ``RolloutPlan.recorded_logq_exact`` (the recorded value is already the fused forward's)."""
    truncated = settings.top_k > 0 or settings.top_p < 1.0
    return "rescored" if rescore_logq and not truncated and not recorded_exact else "recorded"


def describe_logq_source(settings: SamplingSettings, rescore_logq: bool, recorded_exact: bool = False) -> str:
    """One line for the run log saying where log q comes from and why."""
    if logq_source(settings, rescore_logq, recorded_exact) == "rescored":
        return ("log q: rescored by the proposal's fused forward (fp32 accumulation, as log π); "
                "logq_mismatch_mean/std = recorded − rescored per sequence")
    if rescore_logq and recorded_exact and not (settings.top_k > 0 or settings.top_p < 1.0):
        return ("log q: recorded by generate in fp32 on the CPU, the fused forward's own numerics (within 1e-5 "
                "per sequence), so the rescoring forward is skipped")
    if rescore_logq:
        return (f"log q: recorded by generate under top_k={settings.top_k}, top_p={settings.top_p} (the truncated, "
                f"renormalised q the fused head cannot rescore); it carries the generate path's rounding")
    return "log q: recorded by generate (sampling.rescore_logq is false)"


def sampling_layout(*, rank: int, world: int, accumulation: int, micro_batch: int,
                    sampling_batch: int | None) -> list[int]:
    """The sampling chunks of this rank (global chunk numbers, in order), each of ``sampling_batch`` sequences.

    sampling_batch None means ``micro_batch``. Raises ValueError naming ``sampling.batch`` when it is not a
    multiple of the micro-batch or does not divide the rank's share (accumulation · micro_batch sequences).
    """
    batch = micro_batch if sampling_batch is None else sampling_batch
    share = accumulation * micro_batch
    if batch < 1 or batch % micro_batch or share % batch:
        raise ValueError(f"sampling.batch={batch} must be a multiple of train.micro_batch={micro_batch} that divides "
                         f"the {share} sequences each of the {world} ranks samples per step")
    return [k * world + rank for k in range(share // batch)]


def collect_chunks(*, sampler, base, task, tokenizer, plan: RolloutPlan, step: int, timer: PhaseTimer,
                   prompts: PromptSet | None = None, q_engine=None) -> list[ScoredChunk]:
    """Sample and score this rank's share of step ``step`` as ``plan`` lays it out; -> ``plan.accumulation``
    ScoredChunks of ``plan.micro_batch`` sequences each (collective: all ranks call).

    sampler: the engine q is drawn from (the proposal engine, or the policy on-policy, or a ``VllmProposal``
    holding q's weights: training/sampler.py); base: the frozen base
    engine a; task: a ``fdpg_scale.targets.tasks.Task``; timer: receives the "generation" and "scoring" seconds.
    prompts: a conditional target's contexts (each row continues one drawn with the chunk's seed), or None
    for unconditional generation (from the start token: BOS, else EOS; every sample is context 0). q_engine:
    the ZeRO-3 engine that is q, which rescores (None: ``sampler`` itself; give it when ``sampler`` is a vLLM
    copy of q, whose numerics the logged mismatch then measures).
    """
    pad = padding_id(tokenizer)
    settings, micro_batch = plan.settings, plan.micro_batch
    layout = plan.layout()
    size = plan.sequences // len(layout)
    seeds = [chunk_seed(plan.run_seed, step, chunk, plan.stream) for chunk in layout]
    batches, contexts = [], []
    for seed in seeds:
        if prompts is None:
            contexts.append((torch.zeros(size, dtype=torch.long), None, None))
            batches.append([[]] * size)
        else:
            context_ids = torch.as_tensor(prompts.draw(size, seed), dtype=torch.long)
            contexts.append((context_ids, [prompts.texts[c] for c in context_ids.tolist()],
                             prompts.metadata_of(context_ids.tolist())))
            batches.append([list(prompts.token_ids[c]) for c in context_ids.tolist()])
    with timer.phase("generation"):
        if isinstance(sampler, VllmProposal):  # sampling.engine: vllm (``mode`` is the hf path's)
            rollouts = [sampler.sample(b, settings, seed=s, bos_id=start_id(tokenizer),
                                       eos_id=tokenizer.eos_token_id, pad_id=pad) for b, s in zip(batches, seeds)]
        else:
            rollouts = sample_batches(sampler, batches, settings, seeds=seeds, bos_id=start_id(tokenizer),
                                      eos_id=tokenizer.eos_token_id, pad_id=pad, mode=plan.mode)
    rescore = logq_source(settings, plan.rescore_logq, plan.recorded_logq_exact) == "rescored"
    chunks = []
    for big, (context_ids, texts_c, meta_c) in zip(rollouts, contexts):
        for start in range(0, size, micro_batch):
            rollout = big.rows(start, start + micro_batch)
            rows = slice(start, start + micro_batch)
            chunks.append(_score(rollout, context_ids[rows], None if texts_c is None else texts_c[rows],
                                 None if meta_c is None else {k: v[rows] for k, v in meta_c.items()},
                                 q_engine=sampler if q_engine is None else q_engine, base=base, task=task,
                                 tokenizer=tokenizer, pad=pad,
                                 temperature=settings.temperature if rescore else None, timer=timer))
    return chunks


def _score(rollout: Rollout, context_ids: torch.Tensor, contexts: list[str] | None, metadata: dict | None, *,
           q_engine, base, task, tokenizer, pad: int, temperature: float | None, timer: PhaseTimer) -> ScoredChunk:
    """One micro-batch scored: base log a, the target, and (temperature not None) log q rescored at T."""
    generated = rollout.input_ids[:, rollout.prompt_len:]
    gen_mask = rollout.gen_mask[:, rollout.prompt_len:]
    texts = tokenizer.batch_decode(generated.masked_fill(~gen_mask, pad), skip_special_tokens=True)
    samples = Samples(token_ids=generated, mask=gen_mask, texts=texts, context_ids=context_ids, contexts=contexts,
                      metadata=metadata)
    recorded = rollout.logprobs.sum(-1)
    with timer.phase("scoring"), torch.no_grad():
        logp_base = sequence_logprobs(base, rollout.input_ids, rollout.attention_mask, rollout.gen_mask).cpu()
        if temperature is not None:
            rescored = sequence_logprobs(q_engine, rollout.input_ids, rollout.attention_mask, rollout.gen_mask,
                                         temperature=temperature).float().cpu()
            rollout = dataclasses.replace(rollout, logprobs=rescored.masked_fill(~rollout.gen_mask, 0.0))
        try:
            log_scores, features, problem = task.target.log_scores(samples), task.features(samples), None
        except NonFiniteScoreError as err:
            # Not raised here: only this rank saw it, and the step's fate is decided on all ranks together
            # (training/nonfinite.py), which skips the step or stops the run with this message.
            n = generated.shape[0]
            log_scores, problem = torch.full((n,), math.nan), str(err)
            features = {name: torch.full((n,), math.nan) for name in task.names}
        return ScoredChunk(rollout=rollout, samples=samples, logp_base=logp_base, log_scores=log_scores,
                           features=features, logq_recorded=recorded, problem=problem)


def logq_mismatch_metrics(recorded_minus_used: torch.Tensor) -> dict[str, float]:
    """Mean and std of [N] log q(x) recorded by generate − log q(x) used (rescored), per sequence of the global
    batch: how far the sampler's numerics drift from the fused forward's. Both 0 with the recorded log q."""
    diff = recorded_minus_used.double()
    return {"logq_mismatch_mean": float(diff.mean()),
            "logq_mismatch_std": float(diff.std()) if diff.numel() > 1 else 0.0}
