"""A whole, hook-free copy of a frozen ZeRO-3 engine's model, for sampling and scoring without ZeRO-3 per step.

A frozen engine (the base a, the proposal q) changes never (a) or only when q ← π is decided. Through the engine
each use pays ZeRO-3's machinery: a rollout gathers the whole model and takes every module's hooks off and on
again (generation.py), and each scoring forward runs a pre- and post-forward hook per module that gathers and
frees its parameters. With one rank nothing is even partitioned. ``InferenceCopy`` gathers the engine's
parameters once into a plain transformers model of the same class and config (outside ``zero.Init``, so not
partitioned), wrapped in the same ``FusedHeadLM``: the same function of the same weights, so sampling and
scoring give the values the engine gives, at the cost of one whole model per rank for as long as the copy lives
(``train.inference_copies``). ``refresh()`` gathers again after the engine's weights changed (q ← π).

It stands where an engine stands for ``sequence_logprobs`` (engines.py) and ``sample_batches`` (generation.py):
``.device``, ``.module`` (the ``FusedHeadLM``) and a call that returns per-token log-probs.
"""

from __future__ import annotations

import torch

from fdpg_scale.distributed.engines import FusedHeadLM

__all__ = ["InferenceCopy"]


class InferenceCopy:
    """A plain copy of frozen ZeRO-3 engine ``engine``'s model (gathered once; ``refresh`` gathers again).

    Collective when built and refreshed (every rank gathers its shards' full parameters)."""

    def __init__(self, engine):
        if engine.module.trainable:
            raise ValueError("an inference copy is of a frozen engine (base or proposal): the policy changes every "
                             "step, and its copy would be stale after the first")
        hf = engine.module.hf_model
        self.engine = engine
        self.device = engine.device
        # Built by the class itself, not from_pretrained: transformers would partition it under the run's ZeRO-3
        # config. The config is the engine's own (dropout already 0).
        plain = type(hf)(hf.config).to(device=self.device, dtype=next(iter(hf.parameters())).dtype)
        plain.requires_grad_(False)
        plain.eval()
        plain.generation_config = hf.generation_config
        self.module = FusedHeadLM(plain, trainable=False).train(False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the engine's current full parameters into this copy (collective: a gather on every rank)."""
        import deepspeed

        source = dict(self.engine.module.hf_model.named_parameters())
        target = dict(self.module.hf_model.named_parameters())
        if source.keys() != target.keys():
            raise RuntimeError(f"the engine's parameters {sorted(source.keys() ^ target.keys())} have no match in "
                               f"a fresh {type(self.module.hf_model).__name__} of the same config")
        with deepspeed.zero.GatheredParameters(list(source.values()), modifier_rank=None):
            for name, p in source.items():
                target[name].copy_(p.data)

    def __call__(self, input_ids, attention_mask, loss_mask, temperature: float = 1.0) -> torch.Tensor:
        """``FusedHeadLM.forward`` of the copy: [B, T] log softmax(logits/T)[x_t] (as the engine's call)."""
        return self.module(input_ids, attention_mask, loss_mask, temperature)
