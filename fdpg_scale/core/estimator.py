"""The f-DPG estimator's loss and state: baseline, running log Z (global and per context), proposal schedule.

Math (Go et al. 2023, Theorem 1; DESIGN.md §1). Target p = P/Z, policy π_θ, proposal q, t = π/p:

    D_f(π‖p) = Σ_x p(x) f(π(x)/p(x))
    ∇_θ D_f  = Σ_x p f′(π/p) ∇π/p = Σ_x π f′(t) ∇log π = E_{x∼q}[(π/q) f′(t) ∇log π]
             = E_{x∼q}[w(x) ∇log π(x)],     w = (π/q)·(B − r),  r = −f′(t)  (pseudo-reward),  B a constant:

the baseline term vanishes because B·E_q[(π/q)∇log π] = B·∇Σ_x π(x) = B·∇1 = 0. So with w detached the
loss ``mean_i(w_i · log π(x_i))`` over x_i ∼ q has expected gradient ∇D_f(π‖p) (``fdpg_loss``; the weights
come from ``fdpg_scale.kernels.fdiv_weights``). This holds for the true log Z; the estimate below is
consistent, not unbiased, in log Z (as in the paper). tests/estimator/test_unbiased_gradient.py checks the
identity exactly (every sequence enumerated, float64) for every divergence.

Baseline (``MovingAverageBaseline``). Any B that does not depend on the batch it is used on keeps the
estimator unbiased, so B is a moving average of *earlier* batches and is updated after its use. Its batch
statistic is the self-normalised importance-weighted mean Σ ρ_i r_i / Σ ρ_i (ρ = π/q), an estimate of
E_π[r]: on-policy (ρ = 1) that is the classic "average reward" baseline, and off-policy it is still the
mean of r under the policy whose score ∇log π the weight multiplies (a plain mean would estimate E_q[r], the
wrong centre once q has drifted from π). Self-normalised rather than (1/n)Σ ρ r because it is a convex
combination of observed rewards: one huge ρ cannot throw B outside their range.

log Z (``LogZEstimator``, ``PerContextLogZ``). Every term P(x)/q(x), x ∼ q, is unbiased for Z whatever q
produced it, so Ẑ = (1/n) Σ_{all samples so far} P(x_i)/q(x_i). Kept in log space as (log S, n), S = Σ P/q:
a batch's log-sum is m + log Σ_i exp(log w_i − m) with m the *global* max over all ranks, then S and n are
all-reduced (sums) and folded in with logaddexp. Because m is global, each rank computes exactly the terms
one process would; only the summation order differs, so log Z is the same to float64 rounding for any number
of ranks. A batch with no sample of positive weight (every log P = −inf) leaves log Z (and n) unchanged and
is reported as skipped; that drops those samples' zeros from the mean (Z is over-estimated by the factor
n_all/n_counted), which only matters when such batches are frequent, i.e. when q almost never hits the
support, where no estimate of Z is usable anyway.

Proposal update (``ProposalSchedule``): every ``interval`` steps, replace q by π when an importance-sampled
estimate (samples from q) says π is closer to p than q is, under KL(p‖·) or TV. Self-normalised with
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
    """B = exponential moving average of earlier batches' importance-weighted mean pseudo-reward.

    ``value`` is what a batch uses (0.0 before any update: with no history there is nothing to subtract);
    ``update`` folds that batch in *after* its use. The first update sets B to the batch statistic (no decay
    toward the arbitrary 0). ``enabled=False`` keeps B = 0 (updates are ignored).
    """

    def __init__(self, momentum: float = 0.9, *, enabled: bool = True):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.enabled = bool(enabled)
        self.value = 0.0
        self.updates = 0

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

    def update(self, pseudo_reward: torch.Tensor, importance_ratio: torch.Tensor | None = None) -> float | None:
        """Fold a batch ([B] r, [B] ρ or None) into B, after B was used on it; returns the batch statistic
        (None, and B unchanged, when every ρ is 0)."""
        stat = self.batch_statistic(pseudo_reward, importance_ratio)
        if self.enabled and stat is not None:
            self.value = stat if self.updates == 0 else self.momentum * self.value + (1.0 - self.momentum) * stat
            self.updates += 1
        return stat

    def state_dict(self) -> dict:
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.updates = int(state["updates"])


# ----------------------------------------------------------------------------------------------- log Z
def _batch_log_sums(log_w: torch.Tensor, groups: torch.Tensor, num_groups: int,
                    collective: Collective) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (all ranks) per-group log Σ exp(log_w) and sample counts: float64 [C] each.

    The max is reduced first so that every rank exponentiates relative to the same global shift.
    """
    lw = log_w.detach().to(torch.float64).cpu()
    g = groups.detach().cpu()
    local_max = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, g, lw, "amax", include_self=True)
    m = collective.all_reduce_max(local_max)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # all −inf: exp(−inf − 0) = 0, no NaN
    terms = torch.exp(lw - shift[g])
    local = torch.zeros(2, num_groups, dtype=torch.float64)
    local[0].index_add_(0, g, terms)
    local[1].index_add_(0, g, torch.ones_like(terms))
    total = collective.all_reduce_sum(local)
    return torch.log(total[0]) + shift, total[1]


class PerContextLogZ:
    """Running log Z(c), c = 0 … C−1 (conditional targets: one partition function per context).

    Every rank calls ``update`` with its own samples (global context ids, same C everywhere); the sums are
    all-reduced through ``collective``, so every rank holds the same values, whatever the world size.
    ``initial`` is the value reported for a context before its first sample with P > 0.
    """

    def __init__(self, num_contexts: int, *, collective: Collective | None = None, initial: float = 0.0):
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be an int ≥ 1, got {num_contexts!r}")
        if not math.isfinite(initial):
            raise ValueError(f"initial must be finite, got {initial}")
        self.num_contexts = num_contexts
        self.collective = collective if collective is not None else LocalCollective()
        self.initial = float(initial)
        self.log_sum = torch.full((num_contexts,), -math.inf, dtype=torch.float64)
        self.count = torch.zeros(num_contexts, dtype=torch.float64)
        self.skipped_batches = 0

    @property
    def value(self) -> torch.Tensor:
        """float64 [C]: log Ẑ(c) = log S(c) − log n(c) (``initial`` where nothing was counted yet)."""
        counted = self.count > 0
        est = self.log_sum - torch.log(torch.where(counted, self.count, torch.ones_like(self.count)))
        return torch.where(counted, est, torch.full_like(est, self.initial))

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
        Returns: bool [C], True where log Z(c) was left unchanged because the global batch held no sample of
            context c with P > 0 (all zero, or none at all).
        """
        _check_vector("log_w", log_w)
        self._check_ids(context_ids, log_w.shape[0])
        bad = torch.isnan(log_w) | (log_w == math.inf)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"log_w[{i}] = {float(log_w[i])}: a log-weight log P − log q must be finite or −inf")
        batch_log_sum, batch_count = _batch_log_sums(log_w, context_ids, self.num_contexts, self.collective)
        hit = batch_log_sum > -math.inf
        self.log_sum = torch.where(hit, torch.logaddexp(self.log_sum, batch_log_sum), self.log_sum)
        self.count = torch.where(hit, self.count + batch_count, self.count)
        if not bool(hit.any()):
            self.skipped_batches += 1
        return ~hit

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum.tolist(), "count": self.count.tolist(),
                "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict) -> None:
        log_sum = torch.tensor(state["log_sum"], dtype=torch.float64)
        count = torch.tensor(state["count"], dtype=torch.float64)
        if log_sum.shape != (self.num_contexts,) or count.shape != (self.num_contexts,):
            raise ValueError(f"state holds {list(log_sum.shape)} log sums and {list(count.shape)} counts, "
                             f"this estimator has num_contexts = {self.num_contexts}")
        self.log_sum, self.count = log_sum, count
        self.skipped_batches = int(state["skipped_batches"])


class LogZEstimator:
    """Running log Z for one (unconditional) target: ``PerContextLogZ`` with a single context.

    ``value`` is a float (``initial`` until the first batch with a sample of P > 0); ``update`` returns True
    when the batch was skipped (no sample of P > 0 on any rank: log Z unchanged).
    """

    def __init__(self, *, collective: Collective | None = None, initial: float = 0.0):
        self._inner = PerContextLogZ(1, collective=collective, initial=initial)

    @property
    def value(self) -> float:
        return float(self._inner.value[0])

    @property
    def count(self) -> int:
        """Samples counted so far (all ranks; skipped batches not included)."""
        return int(self._inner.count[0])

    @property
    def skipped_batches(self) -> int:
        return self._inner.skipped_batches

    def update(self, log_w: torch.Tensor) -> bool:
        """Fold this rank's [B] log P − log q into the estimate (collective); returns True if skipped."""
        _check_vector("log_w", log_w)
        return bool(self._inner.update(log_w, torch.zeros(log_w.shape[0], dtype=torch.long,
                                                          device=log_w.device))[0])

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
    w = torch.exp(log_w - log_z) / n                         # (p_i/q_i)/n: sums to 1 when self-normalised
    if metric == "kl":
        on = w > 0                                           # 0·log 0 = 0: samples outside p's support drop out
        log_p = lP[on] - (log_z[on] if log_z.dim() else log_z)
        return float((w[on] * (log_p - lpi[on])).sum()), float((w[on] * (log_p - lq[on])).sum())
    # (π_i/q_i)/n, self-normalised like w when log Z is (softmax: stable for any spread of log π − log q).
    rho = torch.softmax(lpi - lq, 0) if self_normalised else torch.exp(lpi - lq) / n
    return float(0.5 * (rho - w).abs().sum()), float(0.5 * (1.0 / n - w).abs().sum())


class ProposalSchedule:
    """Decides, every ``interval`` optimizer steps, whether to replace the proposal q by the policy π.

    ``due(step)`` says whether a check happens after ``step`` completed steps; ``should_replace`` makes the
    check on a batch sampled from q and records it. The constructor's interval and metric always win over
    a loaded state (only the counters and the last estimates are restored).
    """

    def __init__(self, interval: int, metric: str = "kl"):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int ≥ 1, got {interval!r}")
        if metric not in PROPOSAL_METRICS:
            raise ValueError(f"metric must be one of {PROPOSAL_METRICS}, got {metric!r}")
        self.interval = interval
        self.metric = metric
        self.checks = 0
        self.replacements = 0
        self.last: dict | None = None
        """The last check's estimates {"pi": D(π, p), "q": D(q, p)}; None before any or when undecided."""

    def due(self, step: int) -> bool:
        """True when ``step`` (optimizer steps completed, ≥ 1) is a multiple of ``interval``."""
        return step > 0 and step % self.interval == 0

    def should_replace(self, *, logp_pi: torch.Tensor, logp_q: torch.Tensor, log_target: torch.Tensor,
                       log_z: float | torch.Tensor | None = None) -> bool:
        """True when the estimate of D(π, p) is below that of D(q, p) on this batch from q ([B] each).

        No decision (False) when the batch has no sample with P > 0.
        """
        est = proposal_estimates(self.metric, logp_pi=logp_pi, logp_q=logp_q, log_target=log_target, log_z=log_z)
        self.checks += 1
        self.last = None if est is None else {"pi": est[0], "q": est[1]}
        replace = est is not None and est[0] < est[1]
        self.replacements += int(replace)
        return replace

    def state_dict(self) -> dict:
        return {"checks": self.checks, "replacements": self.replacements,
                "last": None if self.last is None else dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.checks = int(state["checks"])
        self.replacements = int(state["replacements"])
        last = state["last"]
        self.last = None if last is None else {"pi": float(last["pi"]), "q": float(last["q"])}
