"""The f-DPG estimator's loss and state: baseline, running log Z (global and per context), proposal schedule.

Math (Go et al. 2023, Theorem 1; docs/method.md §3–§6). Target p = P/Z, policy π_θ, proposal q, t = π/p:

    D_f(π‖p) = Σ_x p(x) f(π(x)/p(x))
    ∇_θ D_f  = Σ_x p f′(π/p) ∇π/p = Σ_x π f′(t) ∇log π = E_{x∼q}[(π/q) f′(t) ∇log π]
             = E_{x∼q}[w(x) ∇log π(x)],     w = (π/q)·(B − r),  r = −f′(t)  (pseudo-reward),  B a constant:

the baseline term vanishes because B·E_q[(π/q)∇log π] = B·∇Σ_x π(x) = B·∇1 = 0. So with w detached the
loss ``mean_i(w_i · log π(x_i))`` over x_i ∼ q has expected gradient ∇D_f(π‖p) (``fdpg_loss``; the weights
come from ``fdpg_scale.kernels.fdiv_weights``). This holds for the true log Z; the estimate below is
consistent, not unbiased, in log Z (as in the paper). tests/core/test_unbiased_gradient.py checks the
identity exactly (every sequence enumerated, float64) for every divergence.

Baseline (``MovingAverageBaseline``). Any B that does not depend on the batch it is used on keeps the
estimator unbiased, so B is a moving average of *earlier* batches and is updated after its use. Its batch
statistic is the self-normalised importance-weighted mean Σ ρ_i r_i / Σ ρ_i (ρ = π/q), an estimate of
E_π[r]: on-policy (ρ = 1) that is the classic "average reward" baseline, and off-policy it is still the
mean of r under the policy whose score ∇log π the weight multiplies (a plain mean would estimate E_q[r], the
wrong centre once q has drifted from π). Self-normalised rather than (1/n)Σ ρ r because it is a convex
combination of observed rewards: one huge ρ cannot throw B outside their range.

log Z (``LogZEstimator``, ``PerContextLogZ``). Every term P(x)/q(x), x ∼ q, is unbiased for Z whatever q
produced it, so Ẑ = (1/n) Σ_{all samples so far} P(x_i)/q(x_i), and **every sample counts in n**, zeros (P = 0)
included, whatever batch it came in: dropping the zero terms of batches without a hit would estimate
Z / P(batch has a hit) instead of Z (5× too large at batch 8 on a constraint q meets 2.7% of the time).
Kept in log space as (log S, n), S = Σ P/q: a batch's log-sum is m + log Σ_i exp(log w_i − m) with m the
*global* max over all ranks, then S and n are all-reduced (sums) and folded in with logaddexp. Because m is
global, each rank computes exactly the terms one process would; only the summation order differs, so log Z
is the same to float64 rounding for any number of ranks. Until the first sample with P > 0, S = 0 and
log Ẑ = −inf: there is no estimate yet (reported as such, never as a number).

Proposal update (``ProposalSchedule``): at a multiple of ``interval`` steps, once at least ``min_samples``
samples have accumulated since the last decision, replace q by π when an importance-sampled estimate over
all of them (samples from q) says π is closer to p than q is, under KL(p‖·) or TV. Self-normalised with
ŵ_i = softmax_i(log P_i − log q_i) (p/q up to 1/n; log Z cancels) and, for TV, ρ̂_i = softmax_i(log π_i −
log q_i):

    KL(p‖π) ≈ Σ ŵ_i (log p̂_i − log π_i),  KL(p‖q) ≈ Σ ŵ_i (log p̂_i − log q_i),  log p̂ = log P − log Ẑ_batch
    TV(π,p) ≈ ½ Σ |ρ̂_i − ŵ_i|,              TV(q,p) ≈ ½ Σ |1/n − ŵ_i|

(for kl the decision is the sign of Σ ŵ_i (log π_i − log q_i): more log-likelihood on p's samples). Passing
``log_z`` uses that value instead of the batch's own (Z-normalised estimates; same kl decision).
"""

from __future__ import annotations

import math

import torch

from fdpg_scale.core.collectives import Collective, LocalCollective
from fdpg_scale.core.logspace import log_sum_exp_groups

__all__ = ["fdpg_loss", "MovingAverageBaseline", "LogZEstimator", "PerContextLogZ", "ProposalSchedule",
           "proposal_estimates", "PROPOSAL_METRICS"]

PROPOSAL_METRICS = ("kl", "tv")


def _check_vector(name: str, x, n: int | None = None, *, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be a vector [B], got shape {list(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has shape {list(x.shape)}, expected [{n}] like the first argument")


# ------------------------------------------------------------------------------------------------ loss
def fdpg_loss(logp_pi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The f-DPG surrogate loss mean_i(weight_i · log π(x_i)); its gradient estimates ∇D_f(π‖p).

    Args:
        logp_pi: [B] per-sequence log π_θ(x) *with* autograd history.
        weight: [B] detached weights (``fdiv_weights(...).weight``); cast to logp_pi's dtype and device.
    Returns: 0-d tensor in logp_pi's dtype.
    """
    _check_vector("logp_pi", logp_pi)
    _check_vector("weight", weight, logp_pi.shape[0])
    if weight.requires_grad:
        raise ValueError("weight must be detached (it is a coefficient, not a function of θ): pass weight.detach()")
    if logp_pi.shape[0] == 0:
        raise ValueError("logp_pi is empty ([0]): the loss of an empty batch is undefined")
    return (weight.to(device=logp_pi.device, dtype=logp_pi.dtype) * logp_pi).mean()


# -------------------------------------------------------------------------------------------- baseline
class MovingAverageBaseline:
    """B(c) = exponential moving average of earlier batches' importance-weighted mean pseudo-reward, one per
    context c (CDPG keeps one baseline per context: contexts differ in how much reward they can reach, and one
    shared B would centre each context's weights on the others' rewards).

    ``value`` (a float: the mean over contexts, for logging) and ``values_for`` (per sample) are what a batch
    uses (0.0 before any update of that context: with no history there is nothing to subtract); ``update``
    folds a batch in *after* its use, each context from its own samples only; a context absent from a batch
    keeps its B. The first update of a context sets its B to the batch statistic (no decay toward the
    arbitrary 0). ``enabled=False`` keeps B = 0 (updates are ignored).

    ``exact``: a known constant E_π[r] to use instead of the average (``Divergence.exact_baseline``: 1 for
    forward KL, where r = p/π and E_π[p/π] = Σ_x p(x) = 1 whatever π is). A constant keeps the estimator
    unbiased like any B that does not depend on the batch (docs/method.md §4), without the average's noise.
    """

    def __init__(self, momentum: float = 0.9, *, enabled: bool = True, num_contexts: int = 1,
                 exact: float | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be an int ≥ 1, got {num_contexts!r}")
        if exact is not None and not math.isfinite(exact):
            raise ValueError(f"exact must be a finite float or None, got {exact!r}")
        self.momentum = float(momentum)
        self.enabled = bool(enabled)
        self.exact = None if exact is None else float(exact)
        self.num_contexts = num_contexts
        start = self.exact if (self.enabled and self.exact is not None) else 0.0
        self.values = torch.full((num_contexts,), start, dtype=torch.float64)
        self.counts = torch.zeros(num_contexts, dtype=torch.long)
        """Updates folded into each context's B."""

    @property
    def value(self) -> float:
        """B as one number: the single context's, or the mean over contexts (what ``metrics.jsonl`` logs)."""
        return float(self.values.mean())

    @property
    def updates(self) -> int:
        """Batches folded in so far (the most any context has had)."""
        return int(self.counts.max())

    def values_for(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[B] int64 context ids -> float64 [B] B(c_i) (the per-sample ``baseline`` of ``fdiv_weights``)."""
        return self.values[context_ids.detach().cpu().long()]

    @staticmethod
    def batch_statistic(pseudo_reward: torch.Tensor,
                        importance_ratio: torch.Tensor | None = None) -> float | None:
        """Σ ρ_i r_i / Σ ρ_i from [B] r and [B] ρ = π/q (None: ρ = 1, the plain mean), in float64.

        An overflowed ρ (= inf, from float32) dominates: the inf entries share the weight equally. Returns
        None when every ρ is 0 (every π(x_i) underflowed: the batch says nothing about E_π[r]).
        """
        _check_vector("pseudo_reward", pseudo_reward)
        r = pseudo_reward.detach().to(torch.float64)
        if r.shape[0] == 0:
            raise ValueError("pseudo_reward is empty ([0])")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("pseudo_reward holds a non-finite value (NaN or inf): check the weights' inputs")
        if importance_ratio is None:
            return float(r.mean())
        _check_vector("importance_ratio", importance_ratio, r.shape[0])
        rho = importance_ratio.detach().to(torch.float64)
        if bool(torch.isnan(rho).any()) or bool((rho < 0).any()):
            raise ValueError("importance_ratio must be ≥ 0 and not NaN")
        if bool(torch.isinf(rho).any()):
            rho = torch.isinf(rho).to(torch.float64)
        total = rho.sum()
        if not total > 0:
            return None
        return float((rho * r).sum() / total)

    def update(self, pseudo_reward: torch.Tensor, importance_ratio: torch.Tensor | None = None,
               context_ids: torch.Tensor | None = None) -> float | None:
        """Fold a batch ([B] r, [B] ρ or None, [B] int64 context ids or None for context 0) into B, after B was
        used on it. Returns the batch statistic over the whole batch (None when every ρ is 0); each context
        present is updated from its own samples (unchanged where all its ρ are 0). A no-op with ``exact``."""
        stat = self.batch_statistic(pseudo_reward, importance_ratio)
        if not self.enabled or self.exact is not None:
            return stat
        if context_ids is None:
            context_ids = torch.zeros(pseudo_reward.shape[0], dtype=torch.long)
        _check_vector("context_ids", context_ids, pseudo_reward.shape[0], floating=False)
        ids = context_ids.detach().cpu().long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_contexts):
            raise ValueError(f"context_ids must lie in [0, {self.num_contexts}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        for c in torch.unique(ids).tolist():
            at = ids == c
            c_stat = stat if self.num_contexts == 1 else self.batch_statistic(
                pseudo_reward[at], None if importance_ratio is None else importance_ratio[at])
            if c_stat is None:
                continue
            first = int(self.counts[c]) == 0
            self.values[c] = c_stat if first else self.momentum * float(self.values[c]) + (1.0 - self.momentum) * c_stat
            self.counts[c] += 1
        return stat

    def state_dict(self) -> dict:
        return {"value": self.values.tolist(), "updates": self.counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before per-context baselines hold one float and one int: that is context 0's.
        values = torch.atleast_1d(torch.as_tensor(state["value"], dtype=torch.float64))
        counts = torch.atleast_1d(torch.as_tensor(state["updates"], dtype=torch.long))
        if values.shape != (self.num_contexts,) or counts.shape != (self.num_contexts,):
            raise ValueError(f"the baseline state holds {values.numel()} contexts, this run has {self.num_contexts}")
        if self.exact is None:
            self.values, self.counts = values.clone(), counts.clone()


# ----------------------------------------------------------------------------------------------- log Z
class PerContextLogZ:
    """Running log Z(c), c = 0 … C−1 (conditional targets: one partition function per context).

    Every rank calls ``update`` with its own samples (global context ids, same C everywhere); the sums are
    all-reduced through ``collective``, so every rank holds the same values, whatever the world size.
    Every sample counts in n(c), P = 0 included; a context with no sample of P > 0 yet has log Ẑ(c) = −inf.
    """

    def __init__(self, num_contexts: int, *, collective: Collective | None = None):
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be an int ≥ 1, got {num_contexts!r}")
        self.num_contexts = num_contexts
        self.collective = collective if collective is not None else LocalCollective()
        self.log_sum = torch.full((num_contexts,), -math.inf, dtype=torch.float64)
        self.count = torch.zeros(num_contexts, dtype=torch.float64)

    @property
    def value(self) -> torch.Tensor:
        """float64 [C]: log Ẑ(c) = log S(c) − log n(c); −inf where no sample of context c had P > 0 yet."""
        return self.log_sum - torch.log(self.count.clamp_min(1.0))

    @property
    def has_estimate(self) -> torch.Tensor:
        """bool [C]: True where some sample of context c so far had P > 0 (log Ẑ(c) is finite)."""
        return self.log_sum > -math.inf

    def values_for(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[B] long context ids -> float64 [B] log Ẑ(c_i) (the per-sample ``log_z`` of ``fdiv_weights``)."""
        self._check_ids(context_ids, None)
        return self.value[context_ids.cpu()].to(context_ids.device)

    def _check_ids(self, context_ids, n: int | None) -> None:
        _check_vector("context_ids", context_ids, n, floating=False)
        if context_ids.dtype != torch.long:
            raise TypeError(f"context_ids must be int64, got dtype {context_ids.dtype}")
        if context_ids.numel() and (int(context_ids.min()) < 0 or int(context_ids.max()) >= self.num_contexts):
            raise ValueError(f"context_ids must lie in [0, {self.num_contexts}), got range "
                             f"[{int(context_ids.min())}, {int(context_ids.max())}]")

    def update(self, log_w: torch.Tensor, context_ids: torch.Tensor) -> torch.Tensor:
        """Fold this rank's samples into the estimate (collective: every rank calls it).

        Args:
            log_w: [B] log P(x_i|c_i) − log q(x_i|c_i) (−inf where P = 0; NaN and +inf are rejected).
            context_ids: [B] int64 in [0, C).
        Returns: float64 [C], the number of samples of each context in the global batch (all counted).
        """
        _check_vector("log_w", log_w)
        self._check_ids(context_ids, log_w.shape[0])
        bad = torch.isnan(log_w) | (log_w == math.inf)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"log_w[{i}] = {float(log_w[i])}: a log-weight log P − log q must be finite or −inf")
        # The max is all-reduced first: every rank exponentiates relative to the same global shift.
        batch_log_sum, batch_count = log_sum_exp_groups(log_w, context_ids, self.num_contexts,
                                                        collective=self.collective)
        # Every sample counts, zeros included: n grows by the batch size even when no sample has P > 0
        # (logaddexp(S, −inf) = S). Counting only batches with a hit would estimate Z / P(hit).
        self.log_sum = torch.logaddexp(self.log_sum, batch_log_sum)
        self.count = self.count + batch_count
        return batch_count

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum.tolist(), "count": self.count.tolist()}

    def load_state_dict(self, state: dict) -> None:
        log_sum = torch.tensor(state["log_sum"], dtype=torch.float64)
        count = torch.tensor(state["count"], dtype=torch.float64)
        if log_sum.shape != (self.num_contexts,) or count.shape != (self.num_contexts,):
            raise ValueError(f"state holds {list(log_sum.shape)} log sums and {list(count.shape)} counts, "
                             f"this estimator has num_contexts = {self.num_contexts}")
        self.log_sum, self.count = log_sum, count


class LogZEstimator:
    """Running log Z for one (unconditional) target: ``PerContextLogZ`` with a single context.

    ``value`` is a float, −inf until the first sample with P > 0 (no estimate yet).
    """

    def __init__(self, *, collective: Collective | None = None):
        self._inner = PerContextLogZ(1, collective=collective)

    @property
    def value(self) -> float:
        return float(self._inner.value[0])

    @property
    def count(self) -> int:
        """Samples counted so far (all ranks, every sample)."""
        return int(self._inner.count[0])

    def update(self, log_w: torch.Tensor) -> None:
        """Fold this rank's [B] log P − log q into the estimate (collective)."""
        _check_vector("log_w", log_w)
        self._inner.update(log_w, torch.zeros(log_w.shape[0], dtype=torch.long, device=log_w.device))

    def state_dict(self) -> dict:
        return self._inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._inner.load_state_dict(state)


# ------------------------------------------------------------------------------------ proposal schedule
def proposal_estimates(metric: str, *, logp_pi: torch.Tensor, logp_q: torch.Tensor, log_target: torch.Tensor,
                       log_z: float | None = None) -> tuple[float, float] | None:
    """Importance-sampled (D(π, p), D(q, p)) from samples x_i ∼ q; metric ``kl`` (KL(p‖·)) or ``tv``.

    Args: [B] per-sequence log π, log q, log P (unnormalised, −inf allowed); log_z: None to self-normalise
    with the batch's own Ẑ (see the module docstring), or a log Z to use instead: a float, or [B] per-sample
    log Z(c_i) for a conditional target.
    Returns two floats, or None when no sample has P > 0 (nothing to estimate from).
    """
    if metric not in PROPOSAL_METRICS:
        raise ValueError(f"metric must be one of {PROPOSAL_METRICS}, got {metric!r}")
    _check_vector("logp_pi", logp_pi)
    n = logp_pi.shape[0]
    _check_vector("logp_q", logp_q, n)
    _check_vector("log_target", log_target, n)
    lpi, lq, lP = (x.detach().to(torch.float64).cpu() for x in (logp_pi, logp_q, log_target))
    log_w = lP - lq
    if n == 0 or not bool((log_w > -math.inf).any()):
        return None
    self_normalised = log_z is None
    if self_normalised:
        log_z = float(torch.logsumexp(log_w, 0) - math.log(n))
    log_z = torch.as_tensor(log_z, dtype=torch.float64).cpu()   # scalar, or [B] per-sample log Z(c_i)
    # (p_i/q_i)/n, sums to 1 when self-normalised; exactly 0 outside the support, also where log Z(c) = −inf
    # (no estimate yet: then every sample of c so far had P = 0).
    inside = log_w > -math.inf
    w = torch.where(inside, torch.exp(log_w - torch.where(inside, log_z, torch.zeros_like(log_z))), 0.0) / n
    if metric == "kl":
        on = w > 0                                           # 0·log 0 = 0: samples outside p's support drop out
        log_p = lP[on] - (log_z[on] if log_z.dim() else log_z)
        return float((w[on] * (log_p - lpi[on])).sum()), float((w[on] * (log_p - lq[on])).sum())
    # (π_i/q_i)/n, self-normalised like w when log Z is (softmax: stable for any spread of log π − log q).
    rho = torch.softmax(lpi - lq, 0) if self_normalised else torch.exp(lpi - lq) / n
    return float(0.5 * (rho - w).abs().sum()), float(0.5 * (1.0 / n - w).abs().sum())


class ProposalSchedule:
    """Decides when to replace the proposal q by the policy π, on evidence accumulated over many samples.

    Every step, ``observe`` adds the step's global batch (identical on every rank): log π of the policy *as it
    would sample* (warped like q: same temperature), log q, log P and the context ids. At a multiple of
    ``interval`` optimizer steps (``due``), and only once ``min_samples`` samples have been observed since the
    last decision, ``decide`` compares the importance-sampled D(π, p) with D(q, p) over *all* those samples,
    then clears them (docs/method.md §6: out-of-sample and enough evidence; disco checks on 256 samples every
    16 steps).

    Which π is compared. ``observe`` records log π of the policy at the step that drew each sample (before
    that step's update), but the π that a replacement copies into q is the *current* one, up to
    ``min_samples / global_batch`` updates later. So ``observe`` also keeps each sample's ``rows`` (what the
    backend needs to score it again: token ids and masks, or the toy's sequences), and the step passes
    ``decide`` the pending samples rescored under the current π (``FDPGBackend.rescore_sampling``: one forward
    pass, warped as q samples). Every pending sample was drawn from the current q (the evidence is cleared at
    each decision, and q changes only there), so both estimates are about the right pair. ``decide`` without
    rescored values falls back to the recorded ones (docs/method.md §6 compares the two rules on the toy).
    The constructor's interval, metric and min_samples always win over a loaded state.
    """

    def __init__(self, interval: int, metric: str = "kl", *, min_samples: int = 256):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int ≥ 1, got {interval!r}")
        if metric not in PROPOSAL_METRICS:
            raise ValueError(f"metric must be one of {PROPOSAL_METRICS}, got {metric!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be an int ≥ 1, got {min_samples!r}")
        self.interval = interval
        self.metric = metric
        self.min_samples = min_samples
        self.checks = 0
        self.replacements = 0
        self.last: dict | None = None
        """The last decision's estimates {"pi": D(π, p), "q": D(q, p), "samples": n}; None before any."""
        self._evidence: dict[str, list[float]] = {k: [] for k in _EVIDENCE_KEYS}
        self._rows: list[dict[str, torch.Tensor]] = []

    @property
    def pending(self) -> int:
        """Samples observed since the last decision."""
        return len(self._evidence["logp_q"])

    def observe(self, *, logp_pi: torch.Tensor, logp_q: torch.Tensor, log_target: torch.Tensor,
                context_ids: torch.Tensor | None = None, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Add a batch of samples from q: [B] log π (warped as q is), log q, log P, and int64 context ids;
        ``rows`` ({name: [B, ...]}, optional): what rescores them at the decision (``pending_rows``)."""
        _check_vector("logp_pi", logp_pi)
        n = logp_pi.shape[0]
        _check_vector("logp_q", logp_q, n)
        _check_vector("log_target", log_target, n)
        ids = torch.zeros(n, dtype=torch.long) if context_ids is None else context_ids
        _check_vector("context_ids", ids, n, floating=False)
        if rows is not None:
            for name, x in rows.items():
                if x.shape[:1] != (n,):
                    raise ValueError(f"rows[{name!r}] has shape {list(x.shape)}, expected [{n}, ...]")
            if self._rows and set(rows) != set(self._rows[0]):
                raise ValueError(f"rows hold {sorted(rows)}, the pending ones {sorted(self._rows[0])}")
            self._rows.append({k: v.detach().cpu() for k, v in rows.items()})
        elif self._rows:
            raise ValueError("rows missing: the pending samples have rows, every batch must bring its own")
        for key, x in zip(_EVIDENCE_KEYS, (logp_pi, logp_q, log_target, ids)):
            self._evidence[key].extend(x.detach().cpu().double().tolist() if key != "context_ids"
                                       else x.detach().cpu().long().tolist())

    def pending_rows(self) -> dict[str, torch.Tensor] | None:
        """{name: [n, ...]} the rows of every pending sample, in observation order; None when none were given.
        Batches of different widths (a longer prompt) are right-aligned by the backend that made them."""
        if not self._rows:
            return None
        return {k: torch.cat([r[k] for r in self._rows]) for k in self._rows[0]}

    def due(self, step: int) -> bool:
        """True when ``step`` (optimizer steps completed, ≥ 1) is a multiple of ``interval`` and at least
        ``min_samples`` samples were observed since the last decision."""
        return step > 0 and step % self.interval == 0 and self.pending >= self.min_samples

    def decide(self, log_z: torch.Tensor | None = None, logp_pi: torch.Tensor | None = None) -> bool:
        """True when the accumulated estimate of D(π, p) is below that of D(q, p); clears the evidence.

        log_z: None to self-normalise over the accumulated samples (one target), or the float64 [C] log Ẑ(c)
        of a conditional target (each sample weighted with its own context's Z; −inf where no estimate yet).
        logp_pi: [n] log π of the pending samples under the *current* policy (warped as q is), in observation
        order; None: the values recorded when each was drawn (a stale π; see the class docstring).
        No replacement when no accumulated sample has P > 0 (nothing to estimate from).
        """
        ev = {k: torch.tensor(v, dtype=torch.long if k == "context_ids" else torch.float64)
              for k, v in self._evidence.items()}
        if logp_pi is not None:
            _check_vector("logp_pi", logp_pi, self.pending)
            ev["logp_pi"] = logp_pi.detach().cpu().to(torch.float64)
        per_sample_log_z = None if log_z is None else torch.as_tensor(log_z, dtype=torch.float64)[ev["context_ids"]]
        est = proposal_estimates(self.metric, logp_pi=ev["logp_pi"], logp_q=ev["logp_q"],
                                 log_target=ev["log_target"], log_z=per_sample_log_z)
        self.checks += 1
        self.last = None if est is None else {"pi": est[0], "q": est[1], "samples": len(ev["logp_q"])}
        self._evidence = {k: [] for k in _EVIDENCE_KEYS}
        self._rows = []
        replace = est is not None and est[0] < est[1]
        self.replacements += int(replace)
        return replace

    def state_dict(self) -> dict:
        return {"checks": self.checks, "replacements": self.replacements,
                "last": None if self.last is None else dict(self.last),
                "evidence": {k: list(v) for k, v in self._evidence.items()},
                "rows": [dict(r) for r in self._rows]}

    def load_state_dict(self, state: dict) -> None:
        self.checks = int(state["checks"])
        self.replacements = int(state["replacements"])
        last = state["last"]
        self.last = None if last is None else {k: float(v) for k, v in last.items()}
        evidence = state.get("evidence", {})
        self._evidence = {k: list(evidence.get(k, [])) for k in _EVIDENCE_KEYS}
        # Checkpoints from before rescoring hold no rows: their pending samples are decided on the recorded log π.
        self._rows = [dict(r) for r in state.get("rows", [])]


_EVIDENCE_KEYS = ("logp_pi", "logp_q", "log_target", "context_ids")
