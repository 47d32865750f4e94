"""Fit λ of a distributional target P(x) = a(x)·c(x)·exp(λ·φ(x)) before training starts (φ = the K features).

Draws ``target.fit_samples`` sequences (over all ranks) from the initial proposal, scores them with the base
model and the target, gathers φ [N, K], log a·c and log q on every rank, and solves the SNIS
moment-matching problem of ``fdpg_scale.core.moment_fitting.fit_lambdas`` (E_p[φ_k] = μ̄_k for every k at
once). c(x) is the product of the target's other factors (constraints b, rewards exp(r/β)): λ is fitted for
the whole target, so that the moments hold under p itself. Every rank fits on the same gathered batch, so every rank gets the same λ. The
draws use their own seed stream, independent of the training batches.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fdpg_scale.distributed.launch import all_gather_rows
from fdpg_scale.errors import ConfigError
from fdpg_scale.training.rollout import FIT_STREAM, RolloutPlan, collect_chunks
from fdpg_scale.core.moment_fitting import LambdaFit, fit_lambdas
from fdpg_scale.targets.tasks import Task
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["fit_distributional_task", "fit_task", "describe_fit"]


def fit_distributional_task(task: Task, *, sampler, base, tokenizer, plan: RolloutPlan,
                            n_samples: int) -> tuple[Task, LambdaFit]:
    """The task with λ fitted so that E_p[φ] = ``task.moment`` (collective: every rank calls it).

    n_samples is rounded up to whole micro-batches on every rank. Raises ConfigError naming ``target.moment``
    (one line, with the measured figures) when the fit fails: an unreachable moment or a collapsed effective
    sample size is a property of the config's target on this model, not a bug.
    """
    per_rank = math.ceil(n_samples / (plan.micro_batch * plan.world))
    # The fit's own draws: another seed stream, one generate call per micro-batch, log q rescored where exact.
    fit_plan = dataclasses.replace(plan, accumulation=per_rank, stream=FIT_STREAM, sampling_batch=None,
                                   rescore_logq=True)
    chunks = collect_chunks(sampler=sampler, base=base, task=task, tokenizer=tokenizer, plan=fit_plan, step=0,
                            timer=PhaseTimer())
    names = [c.name for c in task.feature_columns]
    batch = all_gather_rows({"phi": torch.stack([torch.cat([c.features[n] for c in chunks]) for n in names], -1),
                             "log_a": torch.cat([c.logp_base.sum(-1) for c in chunks]),
                             "log_scores": torch.cat([c.log_scores for c in chunks]),
                             "log_q": torch.cat([c.logq for c in chunks])})
    return fit_task(task, batch["phi"], batch["log_a"], batch["log_scores"], batch["log_q"])


def fit_task(task: Task, phi: torch.Tensor, log_a: torch.Tensor, log_scores: torch.Tensor,
             log_q: torch.Tensor) -> tuple[Task, LambdaFit]:
    """The task with λ fitted so that E_p[φ_k] = ``task.moments[k]`` for every feature k, from draws x_i ∼ q.

    phi: [N, K] φ(x_i) (K = the task's features, in order); log_a: [N] log a(x_i); log_scores: [N] the target's
    log-scores of x_i at the task's current λ (all its factors); log_q: [N] log q(x_i).
    """
    phi = phi.to(torch.float64)
    # log c(x) = the target's other factors: the log-scores without the current λ·φ.
    log_c = log_scores.to(torch.float64) - phi @ task.exponential.lambdas
    try:
        fit = fit_lambdas(phi, list(task.moments), log_a.to(torch.float64) + log_c, log_q)
    except (ValueError, RuntimeError) as err:
        keys = ", ".join(f"target.moment={m}" if c.name == "feature" or len(task.columns) == 1
                         else f"target.scorers[{c.name}].moment={m}"
                         for c, m in zip(task.feature_columns, task.moments))
        raise ConfigError(f"{keys} cannot be fitted on {phi.shape[0]} samples of the initial proposal "
                          f"({' '.join(str(err).split())})") from None
    return task.with_lambdas(fit.lambdas), fit


def describe_fit(task: Task, fit: LambdaFit, n_samples: int) -> str:
    """One line for the run log: λ, the fitted moments against their targets, the fit error and the ESS."""
    names = [c.name for c in task.feature_columns]
    target = task.moment
    return (f"λ = {fit.lambdas.tolist()} fitted on {n_samples} samples for {names}: E_p[φ] ≈ "
            f"{fit.moments.tolist()} (target {target}), max|μ̂ − μ̄| = {fit.error:.2e}, ESS {fit.ess:.1f}")
