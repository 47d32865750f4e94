"""Sampling from a ZeRO-3 engine (the proposal q, or the policy when on-policy) with a KV cache.

Two modes:

- ``"gathered"``: all-gather the whole model once per rollout (``GatheredParameters``), take ZeRO's
  per-module hooks off for the duration (else every module's post-forward hook would free what was just
  gathered, and the next token would gather it again: the recipe of TRL's ``unwrap_model_for_generation``),
  generate with plain transformers, put the hooks back, re-partition. For models that fit one device.
  ``sample_batches`` draws several batches (each with its own seed) inside one such gather: one gather per
  rank per training step, however many ``generate`` calls the step's share needs. An ``InferenceCopy``
  (inference_copy.py: a frozen engine's model gathered once and kept whole) samples as it is, in either mode.
- ``"sharded"``: leave the parameters partitioned; each module gathers its weights as it runs, and
  ``synced_gpus=True`` keeps a rank whose sequences all ended joining the other ranks' all-gathers until every
  rank is done (otherwise the collectives deadlock).

What the proposal is: sampling with temperature T, top-k and top-p draws from the *warped* distribution

    q(x_t | x_<t) ∝ exp(z_t / T) restricted to the top-k / top-p set (renormalised),

not from softmax(z_t). The importance weights of f-DPG need log q of the sampled tokens under exactly that
distribution, so the warpers are passed to ``generate`` as our own logits-processor list, and the last
processor (``_RecordLogprobs``) reads the final processed scores: log q(x_t) = log_softmax(processed)[x_t].
It keeps one step of [B, V] scores at a time (the token drawn from them is only known at the next call), not
the whole [B, T, V] history ``output_scores=True`` would hold. Without truncation (top_k=0, top_p=1) this is
exactly ``linear_token_logprobs(..., temperature=T)`` of the same tokens.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from fdpg_scale.core.sequences import first_eos_mask
from fdpg_scale.distributed.inference_copy import InferenceCopy
from fdpg_scale.distributed.settings import SamplingSettings

__all__ = ["SamplingSettings", "Rollout", "sample", "sample_batches", "pad_prompts"]

MODES = ("gathered", "sharded")


@dataclass
class Rollout:
    """A batch of sampled sequences; all tensors [B, T] with T = prompt_len + max_new_tokens."""
    input_ids: torch.Tensor
    """int64: left-padded prompt, then the generated tokens, then pad after EOS / the early stop."""
    attention_mask: torch.Tensor
    """int64: 1 on prompt tokens and generated tokens up to and including EOS."""
    gen_mask: torch.Tensor
    """bool: the generated tokens up to and including the first EOS (what the loss scores)."""
    logprobs: torch.Tensor
    """float32: log q(x_t | x_<t) of each generated token under the warped distribution; 0 off gen_mask."""
    prompt_len: int

    def rows(self, start: int, stop: int) -> "Rollout":
        """Rows ``start:stop`` of every tensor: a micro-batch of a larger rollout (same prompt_len)."""
        sl = slice(start, stop)
        return Rollout(input_ids=self.input_ids[sl], attention_mask=self.attention_mask[sl],
                       gen_mask=self.gen_mask[sl], logprobs=self.logprobs[sl], prompt_len=self.prompt_len)


def pad_prompts(prompts: list[list[int]], *, bos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts; an empty prompt becomes [bos]. -> input_ids, attention_mask int64 [B, P]."""
    if not prompts:
        raise ValueError("prompts must hold at least one prompt (a list of token ids; [] for BOS only)")
    rows = [list(p) if len(p) else [bos_id] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


class _RecordLogprobs:
    """Last logits processor: records log_softmax(final scores)[token drawn from them], one step behind."""

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not known yet
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """-> float32 [B, n_steps] given the tokens drawn at the last step."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
            self.prev = None
        return torch.stack(self.steps, dim=1)


def _zero3_offload(engine):
    """The object that owns the ZeRO-3 module hooks: the optimizer's offload helper, or (no optimizer) itself."""
    opt = engine.optimizer
    offload = getattr(opt, "parameter_offload", opt)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise RuntimeError("engine is not a ZeRO-3 engine (no parameter-offload hooks found)")
    return offload


@contextlib.contextmanager
def _gathered_without_hooks(engine):
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    offload = _zero3_offload(engine)
    # offload.module: the whole model the hooks belong to (a LoRA role's own parameters are only its adapter).
    with deepspeed.zero.GatheredParameters(list(offload.module.parameters()), modifier_rank=None):
        for p in iter_params(offload.module, recurse=True):
            p.ds_active_sub_modules.clear()
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


class _DropAllOnesMaskWarning(logging.Filter):
    """Drops transformers' "We strongly recommend passing in an `attention_mask`" warning, a false alarm here.

    generate() drops an attention mask that is all ones (unpadded prompts, e.g. BOS-only ones) as an
    optimisation; once a row has emitted EOS, its next inputs are the pad token, and the model's padding
    heuristic (pad id among the inputs and no mask) fires. Those rows' outputs are discarded by generate
    and by the masks this module builds, so nothing is wrong. With padded prompts the mask is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "We strongly recommend passing in an `attention_mask`" not in record.getMessage()


@contextlib.contextmanager
def _quiet_all_ones_mask_warning():
    """_DropAllOnesMaskWarning on transformers' loggers for the block (only around our generate call)."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropAllOnesMaskWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _seeded(seed: int, dev: torch.device):
    """Global torch RNG seeded from ``seed`` alone for the block, the caller's RNG state restored after.

    The rank is deliberately not mixed in: the trainer gives every chunk of the global batch its own seed, so
    the same global batch is drawn whatever the world size (rollout.py)."""
    rank_seed = int(np.random.SeedSequence([seed]).generate_state(1, dtype=np.uint64)[0])
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(rank_seed)  # seeds CPU and every CUDA device
        yield


def sample(engine, prompts: list[list[int]], settings: SamplingSettings, *, seed: int, bos_id: int, eos_id: int,
           pad_id: int, mode: str = "gathered") -> Rollout:
    """Sample one continuation per prompt from a ZeRO-3 engine; returns a Rollout (tensors on CPU).

    prompts: this rank's prompts, token-id lists (``[]`` = BOS only); all ranks call together (collective).
    seed: the draw is a function of (seed, model, prompts, settings) only — not of the rank — so give each
    rank's call its own seed when ranks must draw different sequences; the caller's global RNG state is left
    untouched. mode: ``"gathered"`` or ``"sharded"`` (module docstring). pad_id: any valid token id (padded
    slots are masked out; a tokenizer without a pad token can pass its EOS id).
    """
    (rollout,) = sample_batches(engine, [prompts], settings, seeds=[seed], bos_id=bos_id, eos_id=eos_id,
                                pad_id=pad_id, mode=mode)
    return rollout


def sample_batches(engine, batches: list[list[list[int]]], settings: SamplingSettings, *, seeds: list[int],
                   bos_id: int, eos_id: int, pad_id: int, mode: str = "gathered") -> list[Rollout]:
    """Several ``sample`` calls, one per batch of prompts, inside ONE rollout: in ``gathered`` mode the model is
    gathered once for all of them (not once per batch). -> one Rollout per batch, batch i drawn with seeds[i]
    exactly as ``sample(engine, batches[i], settings, seed=seeds[i], ...)`` would draw it.

    Collective: every rank calls it with the same number of batches (sharded mode's ``synced_gpus`` joins
    each generate call of every rank).
    """
    from transformers import GenerationConfig

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(settings, SamplingSettings):
        raise TypeError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
    if len(seeds) != len(batches):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(batches)} batches of prompts")
    model = engine.module.hf_model
    saved_defaults, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    # Eval mode while sampling: transformers turns the KV cache off in a training model with gradient
    # checkpointing. (Dropout is 0 in every engine's config, so the mode changes nothing else.)
    model.eval()
    # An InferenceCopy (inference_copy.py) is whole and hook-free on every rank: nothing to gather or sync.
    whole = isinstance(engine, InferenceCopy)
    gather = _gathered_without_hooks(engine) if mode == "gathered" and not whole else contextlib.nullcontext()
    try:
        with torch.no_grad(), gather, _quiet_all_ones_mask_warning():
            return [_generate(model, engine.device, prompts, settings, seed=seed, bos_id=bos_id, eos_id=eos_id,
                              pad_id=pad_id, synced_gpus=(mode == "sharded" and not whole))
                    for prompts, seed in zip(batches, seeds)]
    finally:
        model.generation_config = saved_defaults
        model.train(was_training)


def _generate(model, dev: torch.device, prompts: list[list[int]], settings: SamplingSettings, *, seed: int,
              bos_id: int, eos_id: int, pad_id: int, synced_gpus: bool) -> Rollout:
    """One ``generate`` call on a model whose parameters are usable as they are (gathered, or hooked)."""
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    input_ids, attention_mask = pad_prompts(prompts, bos_id=bos_id, pad_id=pad_id)
    prompt_len = input_ids.shape[1]

    processors = []
    if settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        processors.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=settings.top_p))
    recorder = _RecordLogprobs()
    processors.append(recorder)
    # Every knob explicit (the warpers above are ours, so generate must add none): a model's saved generation
    # defaults (e.g. top_p=0.9) would otherwise change q without q's log-probs knowing.
    gen_config = GenerationConfig(do_sample=True, num_beams=1, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=settings.max_new_tokens, min_new_tokens=0,
                                  repetition_penalty=1.0, bos_token_id=bos_id, eos_token_id=eos_id,
                                  pad_token_id=pad_id, use_cache=True)
    with _seeded(seed, dev):
        out = model.generate(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                             generation_config=gen_config, logits_processor=LogitsProcessorList(processors),
                             synced_gpus=synced_gpus)
    seqs = out.cpu()
    n_new = seqs.shape[1] - prompt_len
    step_lp = recorder.finish(seqs[:, -1].to(dev)).cpu() if n_new > 0 else torch.zeros(len(prompts), 0)
    if step_lp.shape[1] != n_new:
        raise RuntimeError(f"recorded {step_lp.shape[1]} sampling steps for {n_new} generated tokens")

    # Pad every rollout to the same width so shapes agree across ranks and steps.
    width = prompt_len + settings.max_new_tokens
    ids = torch.full((seqs.shape[0], width), pad_id, dtype=torch.long)
    ids[:, :seqs.shape[1]] = seqs
    produced = torch.zeros_like(ids, dtype=torch.bool)
    produced[:, prompt_len:seqs.shape[1]] = True
    gen = first_eos_mask(ids, eos_id, within=produced)  # an EOS in the prompt does not end the sequence
    logprobs = torch.zeros(ids.shape, dtype=torch.float32)
    logprobs[:, prompt_len:seqs.shape[1]] = step_lp
    logprobs = logprobs.masked_fill(~gen, 0.0)
    mask = torch.cat([attention_mask, gen[:, prompt_len:].long()], dim=1)
    return Rollout(input_ids=ids, attention_mask=mask, gen_mask=gen, logprobs=logprobs, prompt_len=prompt_len)
