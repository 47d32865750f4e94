"""One f-DPG optimizer step, written once for every backend: sample → score → log Z → weigh → backward/step →
baseline → proposal (docs/method.md §3–§6).

The step is the method; a *backend* is the model it runs on. Two implement ``FDPGBackend``:

- ``fdpg_scale.toy.backend.ToyBackend``: the enumerable tabular LM (every quantity has an exact value, so the
  tests in tests/core prove this very function unbiased and convergent);
- ``fdpg_scale.training.backend.ZeroBackend``: the DeepSpeed ZeRO-3 engines that ``fdpg-scale train`` runs.

Order inside a step (and why):

1. ``backend.sample(step)``: this rank's share of the global batch, drawn from q (π on-policy) with log q of the
   warped sampler that drew it, and scored: log P(x) = log a(x) + Σ log-scores.
2. log Z: every sample of the global batch (all ranks) is folded into the running estimate *before* weighing,
   so the batch's own P/q terms are in the Ẑ its weights use (the same value on every rank).
3. weigh + backward: per micro-batch, log π(x) with autograd, ``fdiv_weights`` → w = (π/q)·(B − r), loss
   mean(w · log π); the backend accumulates gradients and steps the optimizer once per global batch.
   Where no sample of a context has had P > 0 yet (log Ẑ(c) = −inf), any finite log Z gives the same weights:
   every sample of that context has t = π/p = ∞, so Z does not enter.
4. baseline: B(c) is updated with this batch's pseudo-rewards *after* its use (B must not depend on the batch
   it weighs, else the estimator is biased); one B per context, or the divergence's exact E_π[r] (forward KL).
5. proposal: the batch joins the accumulated evidence (with the rows that score it again); at a check that has
   enough samples, the pending samples are rescored under the *current* π (the one a replacement would copy)
   and q ← π if π is estimated closer to p (``ProposalSchedule``). Decided after the optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from fdpg_scale.core.collectives import Collective
from fdpg_scale.core.divergences import Divergence
from fdpg_scale.core.estimator import MovingAverageBaseline, PerContextLogZ, ProposalSchedule, fdpg_loss
from fdpg_scale.kernels import fdiv_weights

__all__ = ["Draws", "FDPGBackend", "StepGuard", "FDPGState", "StepSettings", "StepBatch", "StepResult", "fdpg_step",
           "no_estimate"]


@dataclass
class Draws:
    """One micro-batch of this rank's samples from the proposal, scored (b = micro-batch size)."""

    logq: torch.Tensor
    """[b] log q(x) under the (warped) sampler that drew x."""
    log_target: torch.Tensor
    """[b] log P(x), unnormalised; −inf outside the target's support."""
    log_base: torch.Tensor
    """[b] log a(x) of the base model (for KL(π‖a) in the metrics)."""
    context_ids: torch.Tensor
    """[b] int64 context of each sample (all 0 for an unconditional target)."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """{name: [b] float} per-sample quantities whose mean under π is reported (e.g. alignment)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """{name: [b]} per-sample bookkeeping gathered with the batch (e.g. generated token counts)."""
    payload: Any = None
    """What the backend needs to score this micro-batch again (token ids and masks, or sequence rows)."""
    problem: str | None = None
    """Why a score of this micro-batch is not finite (a scorer's message), for a ``StepGuard``; else None."""


@runtime_checkable
class FDPGBackend(Protocol):
    """The model side of an f-DPG step: what ``fdpg_step`` asks of the toy and of the ZeRO-3 engines."""

    collective: Collective
    """Reductions over the ranks that share the global batch (log Z is all-reduced through it)."""

    def sample(self, step: int) -> list[Draws]:
        """This rank's share of step ``step``'s global batch, as micro-batches (collective: all ranks call)."""
        ...

    def policy_logprobs(self, draws: Draws) -> torch.Tensor:
        """[b] log π_θ(x) of the micro-batch, with autograd history."""
        ...

    def sampling_logprobs(self, draws: Draws, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """[b] log-prob of x under π *as it would sample if it became q* (same warping as q), no grad.
        ``policy_logprobs`` ([b], detached) is returned when sampling does not warp."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss (the backend averages over micro-batches
        and ranks)."""
        ...

    def optimizer_step(self) -> None:
        """Apply the accumulated gradient of the global batch (once per step)."""
        ...

    def replace_proposal(self) -> None:
        """q ← π (collective)."""
        ...

    def gather_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [b_r, ...]} on each rank → {name: [N, ...]} the global batch in rank order, on every rank."""
        ...

    def evidence_rows(self, draws: Draws) -> dict[str, torch.Tensor]:
        """{name: [b, ...]} CPU tensors of one micro-batch from which ``rescore_sampling`` scores it again later
        (token ids and masks of a fixed width, so that every step's rows concatenate and gather)."""
        ...

    def rescore_sampling(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N] log-prob under the *current* π, warped as q samples (``sampling_logprobs``), of the global rows
        {name: [N, ...]} (identical on every rank), no grad; collective: each rank scores its share."""
        ...


@runtime_checkable
class StepGuard(Protocol):
    """Checks that keep non-finite values out of the state (the trainer's ``training/nonfinite.py``). Each check
    is collective and answers identically on every rank, so all ranks take the same branch."""

    def samples_ok(self, draws: list[Draws], step: int) -> bool:
        """False: skip step ``step`` (1-based) before anything is applied (a NaN/+inf log q, log a or log P)."""
        ...

    def before_update(self) -> None:
        """Called before the step's first backward."""
        ...

    def update_ok(self, logp_pi: torch.Tensor, weight: torch.Tensor, step: int) -> bool:
        """After the optimizer step, on this rank's [n] log π and weights: False when the update was dropped
        (non-finite loss or gradients); the baseline and the proposal are then left as they were."""
        ...


@dataclass(kw_only=True)
class FDPGState:
    """What the estimator carries from step to step (each part has its own state_dict)."""

    log_z: PerContextLogZ
    """Running log Ẑ(c) over every sample so far (all ranks); one context when unconditional."""
    baseline: MovingAverageBaseline
    proposal_schedule: ProposalSchedule | None
    """None on-policy (no proposal to replace)."""
    proposal_version: int = 0
    """How many times q was replaced by π."""


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """The step's fixed choices (from the run config)."""

    divergence: Divergence
    clip: float | None = None
    """Clamp pseudo-rewards to ±clip (explicit, logged); None: the exact f′."""
    outside_support_reward: float | None = None
    """Pseudo-reward of samples with P = 0 for divergences whose f′ is infinite there (rkl, rchi2, α ≥ 1)."""


@dataclass
class StepBatch:
    """A step's samples with everything the step computed for them; every tensor [n] (one row per sample).

    Built per rank, then gathered: ``StepResult.batch`` is the *global* batch (N = ``train.global_batch``
    rows in rank order), identical on every rank.
    """

    logp_pi: torch.Tensor
    """log π_θ(x) before the update (detached)."""
    logp_sampling: torch.Tensor
    """log π warped as q samples (``FDPGBackend.sampling_logprobs``)."""
    logq: torch.Tensor
    log_target: torch.Tensor
    log_base: torch.Tensor
    context_ids: torch.Tensor
    log_z: torch.Tensor
    """log Ẑ(c_i) the weights used."""
    baseline: torch.Tensor
    """B(c_i) the weights used."""
    weight: torch.Tensor
    pseudo_reward: torch.Tensor
    importance_ratio: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """{scorer name: [n]} (``Draws.features``)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """{name: [n]} (``Draws.extras``)."""
    evidence: dict[str, torch.Tensor] = field(default_factory=dict)
    """{name: [n, ...]} ``FDPGBackend.evidence_rows`` (kept only while a proposal schedule needs them)."""

    _GROUPS = ("features", "extras", "evidence")

    def rows(self) -> dict[str, torch.Tensor]:
        """Flat {name: [n, ...]} CPU tensors (what ``gather_rows`` moves); groups as ``group/name``."""
        flat = {f.name: getattr(self, f.name).detach().cpu() for f in dataclasses.fields(self)
                if f.name not in self._GROUPS}
        for group in self._GROUPS:
            flat.update({f"{group}/{k}": v.detach().cpu() for k, v in getattr(self, group).items()})
        return flat

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor]) -> "StepBatch":
        """The inverse of ``rows``."""
        plain = {k: v for k, v in rows.items() if "/" not in k}
        groups = {g: {k.split("/", 1)[1]: v for k, v in rows.items() if k.startswith(g + "/")} for g in cls._GROUPS}
        return cls(**plain, **groups)

    @classmethod
    def concat(cls, parts: list["StepBatch"]) -> "StepBatch":
        """Micro-batches of one rank, in order, as one batch."""
        rows = [p.rows() for p in parts]
        return cls.from_rows({k: torch.cat([r[k] for r in rows]) for k in rows[0]})


@dataclass
class StepResult:
    """What one step did, for logging (every tensor is the *global* batch, identical on every rank)."""

    batch: StepBatch | None
    """The global batch (None when the step was skipped)."""
    loss: float
    """mean(weight · log π) over the global batch (its gradient estimates ∇D_f)."""
    baseline_used: float
    """B as logged: the mean over contexts of the baselines this step used."""
    replaced: bool
    """True when q was replaced by π after this step."""
    skipped: str | None = None
    """Why the step was skipped by the guard ("samples": nothing applied; "update": the optimizer dropped the
    update and the baseline and proposal were left alone); None for a normal step (then ``batch`` is set)."""


def fdpg_step(backend: FDPGBackend, state: FDPGState, settings: StepSettings, step: int,
              guard: StepGuard | None = None) -> StepResult:
    """Run optimizer step ``step`` (0-based) of f-DPG on ``backend``; updates ``state`` in place.

    Collective when the backend is distributed: every rank calls it, with the same state. ``guard`` (optional)
    may skip the step on non-finite samples or updates (``StepResult.skipped``).
    """
    draws = backend.sample(step)                                                      # 1. sample, score
    if guard is not None and not guard.samples_ok(draws, step + 1):
        return StepResult(batch=None, loss=math.nan, baseline_used=state.baseline.value, replaced=False,
                          skipped="samples")
    state.log_z.update(torch.cat([d.log_target - d.logq for d in draws]),             # 2. log Z (all ranks)
                       torch.cat([d.context_ids for d in draws]))
    # t = ∞ for every sample of a context without an estimate (all its samples had P = 0), whatever Z is:
    # any finite stand-in gives the exact weights and keeps −inf − (−inf) = NaN out of log t.
    log_z = state.log_z.value
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    baseline_used = state.baseline.value
    schedule = state.proposal_schedule

    parts = []
    if guard is not None:
        guard.before_update()
    for d in draws:                                                                   # 3. weigh, backward
        logp_pi = backend.policy_logprobs(d)
        dev = logp_pi.device
        ctx_log_z = log_z.to(dev)[d.context_ids.to(dev)]
        baseline = state.baseline.values_for(d.context_ids).to(dev)
        w = fdiv_weights(logp_pi.detach(), d.logq.to(dev), d.log_target.to(dev), ctx_log_z,
                         settings.divergence, baseline=baseline, clip=settings.clip,
                         outside_support_reward=settings.outside_support_reward)
        backend.backward(fdpg_loss(logp_pi, w.weight))
        parts.append(StepBatch(logp_pi=logp_pi.detach(), logp_sampling=backend.sampling_logprobs(d, logp_pi.detach()),
                               logq=d.logq, log_target=d.log_target, log_base=d.log_base, context_ids=d.context_ids,
                               log_z=ctx_log_z, baseline=baseline, weight=w.weight, pseudo_reward=w.pseudo_reward,
                               importance_ratio=w.importance_ratio, features=d.features, extras=d.extras,
                               evidence={} if schedule is None else backend.evidence_rows(d)))
    backend.optimizer_step()
    local = StepBatch.concat(parts)
    if guard is not None and not guard.update_ok(local.logp_pi, local.weight, step + 1):
        return StepResult(batch=None, loss=math.nan, baseline_used=baseline_used, replaced=False, skipped="update")

    batch = StepBatch.from_rows(backend.gather_rows(local.rows()))                     # the global batch
    state.baseline.update(batch.pseudo_reward, batch.importance_ratio, batch.context_ids)  # 4. after its use

    replaced = False                                                                  # 5. proposal
    if schedule is not None:
        schedule.observe(logp_pi=batch.logp_sampling, logp_q=batch.logq, log_target=batch.log_target,
                         context_ids=batch.context_ids, rows=batch.evidence or None)
        if schedule.due(step + 1):
            rows = schedule.pending_rows()
            # Rows cover every pending sample unless the evidence began in a checkpoint written without them.
            current = None if rows is None or next(iter(rows.values())).shape[0] != schedule.pending \
                else backend.rescore_sampling(rows)
            conditional = state.log_z.num_contexts > 1
            replaced = schedule.decide(state.log_z.value if conditional else None, logp_pi=current)
            if replaced:
                backend.replace_proposal()
                state.proposal_version += 1
    loss = float((batch.weight.double() * batch.logp_pi.double()).mean())
    return StepResult(batch=batch, loss=loss, baseline_used=baseline_used, replaced=replaced)


def no_estimate(value: float) -> float | None:
    """A log Z (or any estimate) for logging: None (JSON null) when it is not finite, i.e. no estimate yet."""
    return value if math.isfinite(value) else None
