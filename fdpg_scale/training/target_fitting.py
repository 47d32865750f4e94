"""Fit λ of a distributional target P(x) = a(x)·exp(λ·φ(x)) before training starts.

Draws ``target.fit_samples`` sequences (over all ranks) from the initial proposal, scores them with the base
model, gathers φ, log a and log q on every rank, and solves the SNIS moment-matching problem of
``fdpg_scale.targets.energy.fit_lambdas`` (E_p[φ] = μ̄). Every rank fits on the same gathered batch, so every rank
gets the same λ. The draws use their own seed stream, independent of the training batches.
"""

from __future__ import annotations

import math

import torch

from fdpg_scale.distributed.launch import all_gather_rows
from fdpg_scale.errors import ConfigError
from fdpg_scale.distributed.generation import SamplingSettings
from fdpg_scale.training.rollout import FIT_STREAM, collect_chunks
from fdpg_scale.targets.energy import LambdaFit, fit_lambdas
from fdpg_scale.targets.tasks import Task
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["fit_distributional_task"]


def fit_distributional_task(task: Task, *, sampler, base, tokenizer, settings: SamplingSettings, mode: str,
                            run_seed: int, rank: int, world: int, micro_batch: int,
                            n_samples: int) -> tuple[Task, LambdaFit]:
    """The task with λ fitted so that E_p[φ] = ``task.moment`` (collective: every rank calls it).

    n_samples is rounded up to whole micro-batches on every rank. Raises ConfigError naming ``target.moment``
    (one line, with the measured figures) when the fit fails: an unreachable moment or a collapsed effective
    sample size is a property of the config's target on this model, not a bug.
    """
    per_rank = math.ceil(n_samples / (micro_batch * world))
    chunks = collect_chunks(sampler=sampler, base=base, task=task, tokenizer=tokenizer, settings=settings, mode=mode,
                            run_seed=run_seed, step=0, rank=rank, world=world, accumulation=per_rank,
                            micro_batch=micro_batch, timer=PhaseTimer(), stream=FIT_STREAM)
    batch = all_gather_rows({"phi": torch.cat([c.feature for c in chunks]),
                             "log_a": torch.cat([c.logp_base.sum(-1) for c in chunks]),
                             "log_q": torch.cat([c.logq for c in chunks])})
    try:
        fit = fit_lambdas(batch["phi"].to(torch.float64)[:, None], [task.moment], batch["log_a"], batch["log_q"])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"target.moment={task.moment} cannot be fitted on {batch['phi'].shape[0]} samples of the "
                          f"initial proposal ({' '.join(str(err).split())})") from None
    return task.with_lambdas(fit.lambdas), fit
