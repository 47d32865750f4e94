"""Evaluation during training (``eval.every``, ``eval.samples``): fresh samples from π, logged as ``eval/*``.

Every ``eval.every`` optimizer steps (and after the last), the policy itself draws ``eval.samples`` sequences
over all ranks, at temperature 1 with no truncation (π as it is, whatever ``sampling.*`` says), continuing
the start token or prompts drawn as training draws them. The draws use their own seed stream
(``EVAL_STREAM``): they never change what training samples, so a run with evaluation trains exactly as one
without, and a resumed run evaluates as the uninterrupted one would. Each sample is scored as a training
sample is (base log a, the target, log π rescored by the fused head: ``training/rollout.collect_chunks``).

Logged beside the step's training metrics, with the ``eval/`` prefix:

- ``alignment`` (or ``alignment/<name>`` per scorer) = E_π of each scorer's quantity, a plain mean;
- ``kl_pi_a`` = KL(π‖a) = E_π[log π − log a], a plain mean;
- ``kl_p_pi``, ``kl_pi_p``, ``tv``, ``js``, ``ess``, ``log_z_is`` (and their ``_se``): the importance-sampled
  estimates of ``core.metrics.importance_sampled_metrics`` with q = π, *self-normalised* on these draws
  (Ẑ(c) from these samples per context, not the trainer's running log Z);
- ``distinct_1``, ``distinct_2``, ``self_bleu_3`` of the samples.

``fdpg-scale eval`` after training estimates KL(p‖π) differently (importance sampling from the base model,
which covers p's support by construction): the two agree in expectation, and ``eval/kl_p_pi`` is the cheaper
one that needs no base draws.
"""

from __future__ import annotations

import dataclasses

import torch

from fdpg_scale.core.metrics import diversity_metrics, importance_sampled_metrics
from fdpg_scale.distributed.generation import SamplingSettings
from fdpg_scale.distributed.launch import all_gather_rows
from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.training.alignment import column
from fdpg_scale.training.rollout import RolloutPlan, collect_chunks
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["EVAL_STREAM", "eval_accumulation", "is_due", "evaluate_policy"]

EVAL_STREAM = 2
"""Seed stream of the evaluation draws (training uses 0, the λ fit 1: ``training/rollout.py``)."""
#: Self-BLEU scores at most this many hypotheses, as ``fdpg-scale eval`` does.
SELF_BLEU_HYPOTHESES = 100


def eval_accumulation(samples: int, *, micro_batch: int, world: int) -> int:
    """Micro-batches of ``micro_batch`` each rank draws for ``samples`` sequences over ``world`` ranks; a
    one-line ConfigError when they do not split evenly (checked before any engine starts)."""
    per = micro_batch * world
    if samples % per:
        raise ConfigError(f"eval.samples={samples} is not a multiple of train.micro_batch × world size = "
                          f"{micro_batch} × {world} = {per}")
    return samples // per


def is_due(step: int, *, every: int, total: int) -> bool:
    """Whether optimizer step ``step`` (1-based, just completed) is followed by an evaluation."""
    return every > 0 and (step % every == 0 or step == total)


def evaluate_policy(*, policy, base, task, tokenizer, prompts, plan: RolloutPlan, step: int,
                    samples: int) -> dict[str, float]:
    """The ``eval/*`` metrics of the module docstring after step ``step`` (collective: every rank calls it and
    gets the same dict).

    policy, base: the ZeRO-3 engines of π and a; task: the run's ``Task``; prompts: its ``PromptSet`` or None;
    plan: the run's training ``RolloutPlan`` (its mode, seed, rank, world, micro-batch and max_new_tokens are
    kept; the sampling becomes π's own at temperature 1 on ``EVAL_STREAM``); samples: ``eval.samples``.
    """
    accumulation = eval_accumulation(samples, micro_batch=plan.micro_batch, world=plan.world)
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=plan.settings.max_new_tokens)
    eval_plan = dataclasses.replace(plan, settings=settings, accumulation=accumulation, stream=EVAL_STREAM,
                                    sampling_batch=None, rescore_logq=True)
    chunks = collect_chunks(sampler=policy, base=base, task=task, tokenizer=tokenizer, plan=eval_plan, step=step,
                            timer=PhaseTimer(), prompts=prompts)
    rows = {"logp_pi": torch.cat([c.logq for c in chunks]).double(),
            "logp_a": torch.cat([c.logp_base.sum(-1) for c in chunks]).double(),
            "log_target": torch.cat([c.log_target for c in chunks]).double(),
            "context_ids": torch.cat([c.context_ids for c in chunks]),
            "token_ids": torch.cat([c.samples.token_ids for c in chunks]),
            "mask": torch.cat([c.samples.mask for c in chunks])}
    for name in task.names:
        rows[f"feature/{name}"] = torch.cat([c.features[name] for c in chunks]).double()
    rows = all_gather_rows(rows)
    features = {name: rows[f"feature/{name}"] for name in task.names}
    metrics = importance_sampled_metrics(logp_pi=rows["logp_pi"], logp_q=rows["logp_pi"], logp_a=rows["logp_a"],
                                         log_target=rows["log_target"], log_z=None, features=features,
                                         context_ids=None if prompts is None else rows["context_ids"])
    out = {k: v for k, v in metrics.items() if not k.startswith(("phi_mean/", "phi_mean_se/"))}
    for name in task.names:  # a plain mean over π's own samples (q = π: the IS estimate is the same number)
        out[column("alignment", name, len(task.names))] = float(features[name].mean())
    out["kl_pi_a"] = float((rows["logp_pi"] - rows["logp_a"]).mean())
    drawn = Samples(token_ids=rows["token_ids"], mask=rows["mask"])
    out.update(diversity_metrics(drawn.sequences(), distinct=(1, 2), bleu_n=(3,),
                                 max_hypotheses=SELF_BLEU_HYPOTHESES))
    return {f"eval/{k}": v for k, v in out.items()}
