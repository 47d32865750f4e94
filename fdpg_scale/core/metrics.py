"""Importance-sampled divergences between the policy π and the target p, and diversity of samples.

Importance sampling (docs/method.md §8). Samples x_i ∼ q (i = 1 … N) with per-sequence log π, log q,
log a (base), log P (unnormalised target). Write

    α_i = log π(x_i) − log q(x_i),     β̃_i = log P(x_i) − log q(x_i),     β_i = β̃_i − log Z,

so e^α = π/q and e^β = p/q. Every metric is E_q[h(α, β, …)] for a per-sample h:

    KL(p‖π)   h = e^β (β − α)                                 "kl_p_pi"
    KL(π‖p)   h = e^α (α − β)                                 "kl_pi_p"
    TV(π, p)  h = ½ |e^α − e^β|                               "tv"
              (unbiased, so on a small batch it can leave [0, 1]: a few large π/q or p/q make the sample
              mean of ½|π/q − p/q| exceed 1 although its expectation cannot; "tv_bounded" beside it is the
              self-normalised ½ Σ_i |π̂_i − p̂_i|, π̂ = softmax(α), p̂ = softmax(β̃) within each context: a TV
              between two distributions on the sampled points, so always in [0, 1], consistent, biased O(1/N))
    JS(π, p)  h = ½ e^α (log 2 − softplus(β − α)) + ½ e^β (log 2 − softplus(α − β))     "js"
              (= ½ KL(π‖m) + ½ KL(p‖m), m = (π + p)/2; log(2π/(π+p)) = log 2 − softplus(β − α))
    KL(π‖a)   h = e^α (log π − log a)                         "kl_pi_a"
    E_π[φ_k]  h = e^α φ_k                                     "phi_mean/<name>"  (constraint satisfaction)

with 0·(anything) = 0 where a weight is e^−inf = 0 (a sample outside p's support contributes nothing to
E_p; KL(π‖p) is then +inf, its true value, when π puts mass there). Computed in float64.

log Z: Ẑ = (1/N) Σ_i e^{β̃_i} ("log_z_is": log-mean-exp, stabilised by the max), a plain mean for Z.
- Z-normalised (``log_z`` given, e.g. the trainer's running estimate; scalar or per-sample [N] for per-context
  Z(c)): each metric is a plain mean of h_i; standard error std(h)/√N.
- Self-normalised (``log_z=None``): log Z is replaced by the same batch's log Ẑ (per context when
  ``context_ids`` is given). The estimator θ̂ = mean_i h_i(log Ẑ) is then a ratio-type estimator (biased,
  O(1/N)); its standard error is the delta method's: with ℓ_c = log Z(c),

      θ̂ − θ ≈ (1/N) Σ_i ψ_i,   ψ_i = h_i − θ̂ + (N/N_c)·(∂θ̂/∂ℓ_c)·(e^{β̃_i − ℓ_c} − 1),  c = c(i),

  since ℓ̂_c − ℓ_c ≈ (1/N_c) Σ_{i∈c} (e^{β̃_i − ℓ_c} − 1); ∂θ̂/∂ℓ_c comes from autograd. SE = std(ψ)/√N.
  (ψ is centred over the whole batch, i.e. (context, sample) pairs are treated as i.i.d. draws.)
log Ẑ's own standard error is the delta method's se(Ẑ)/Ẑ.

ESS of the target weights w_i = P/q: (Σ w)²/Σ w² ("ess"; per context and summed with contexts), and
"ess_fraction" = ESS/N, whose large-N limit is 1/E_q[(p/q)²] = 1/(1 + χ²(p‖q)) (``exact_metrics``), with
a delta-method standard error (a ratio of the means of w and w²). That error rests on E_q[w⁴]: with
heavy-tailed weights or few samples it is itself noisy and too small (measured on the enumerable toy: at
N = 400 and ESS/N ≈ 0.09 the spread of ess_fraction was 1.75× its reported error; ≈ 1× at N = 20 000).

On an enumerable problem every quantity has an exact value: ``exact_metrics`` computes them from the full
enumeration (the same h with q replaced by the counting measure, summed instead of averaged).

Diversity (Li et al. 2016; Zhu et al. 2018, Texygen): ``distinct_n`` = distinct n-grams / total n-grams over
the whole set; ``self_bleu`` = mean over samples of BLEU-n of the sample against all the others as references
(nltk's ``sentence_bleu``, uniform weights over 1…n-grams, smoothing ``SmoothingFunction().method1``: a
zero n-gram match count is replaced by ε = 0.1 before dividing; nltk returns 0 outright when not even a
unigram matches). ``max_hypotheses`` subsamples which samples are scored (the references stay all others),
an unbiased estimate of the full mean at cost O(m·N) instead of O(N²).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fdpg_scale.core.logspace import context_groups, log_sum_exp_groups

__all__ = ["importance_sampled_metrics", "exact_metrics", "distinct_n", "self_bleu", "diversity_metrics",
           "DIVERGENCE_METRICS"]

_LOG2 = math.log(2.0)


def _exp_times(log_u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """e^{log_u}·v with 0 wherever log_u = −inf (whatever v is), and no NaN gradient through the mask."""
    zero = torch.isneginf(log_u)
    safe_u = torch.where(zero, torch.zeros_like(log_u), log_u)
    safe_v = torch.where(zero, torch.zeros_like(v), v)
    return torch.where(zero, torch.zeros_like(log_u), torch.exp(safe_u) * safe_v)


def _kl_p_pi(al, be, aux):
    return _exp_times(be, be - al)


def _kl_pi_p(al, be, aux):
    return _exp_times(al, al - be)


def _tv(al, be, aux):
    return 0.5 * (_exp_times(al, torch.ones_like(al)) - _exp_times(be, torch.ones_like(be))).abs()


def _js(al, be, aux):
    # softplus(±(β − α)) is +inf only when one of them is ±inf, exactly where _exp_times zeroes the term.
    first = _exp_times(al, _LOG2 - F.softplus(torch.where(torch.isneginf(al), torch.zeros_like(be), be - al)))
    second = _exp_times(be, _LOG2 - F.softplus(torch.where(torch.isneginf(be), torch.zeros_like(al), al - be)))
    return 0.5 * (first + second)


DIVERGENCE_METRICS: dict[str, Callable] = {"kl_p_pi": _kl_p_pi, "kl_pi_p": _kl_pi_p, "tv": _tv, "js": _js}
"""name -> h(α, β, aux) per sample (module docstring); those that depend on log Z."""


def _as_vector(x, n: int | None, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64).cpu()
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        raise ValueError(f"{name} must be a per-sequence vector [N]{'' if n is None else f' = ({n},)'}, got shape "
                         f"{tuple(t.shape)}")
    if bool(torch.isnan(t).any()) or bool((t == math.inf).any()):
        raise ValueError(f"{name} contains NaN or +inf")
    return t


def importance_sampled_metrics(*, logp_pi: torch.Tensor, logp_q: torch.Tensor, logp_a: torch.Tensor,
                               log_target: torch.Tensor, log_z: float | torch.Tensor | None = None,
                               features: Mapping[str, torch.Tensor] | None = None,
                               context_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Divergences between π and p, KL(π‖a), E_π[φ], log Ẑ and ESS, from N samples x_i ∼ q.

    logp_pi, logp_q, logp_a: [N] per-sequence log π(x_i), log q(x_i), log a(x_i); log_target: [N] log P(x_i)
    (−inf allowed); log_z: None (self-normalised: the batch's own log Ẑ, per context if context_ids), a
    float, or [N] per-sample log Z(c(i)) (Z-normalised); features: name -> [N] φ(x_i); context_ids: [N] ints.

    Returns floats: kl_p_pi, kl_pi_p, tv, tv_bounded, js, kl_pi_a, phi_mean/<name>, log_z_is, ess, ess_fraction, and
    for each estimate X (except ess and tv_bounded) its standard error X_se (phi_mean_se/<name> for features). "log_z_is" is
    the batch's importance-sampled estimate (mean over contexts of log Ẑ(c) with contexts), never the
    ``log_z`` passed in.
    """
    lp = _as_vector(logp_pi, None, "logp_pi")
    n = lp.shape[0]
    if n == 0:
        raise ValueError("importance_sampled_metrics: no samples (N = 0)")
    lq = _as_vector(logp_q, n, "logp_q")
    la = _as_vector(logp_a, n, "logp_a")
    lt = _as_vector(log_target, n, "log_target")
    if bool(torch.isneginf(lq).any()):
        raise ValueError("logp_q contains −inf: a sample drawn from q has q(x) > 0")
    _, inverse = context_groups(None if context_ids is None else torch.as_tensor(context_ids), n)
    n_groups = int(inverse.max()) + 1
    alpha = lp - lq
    beta_raw = lt - lq  # log P/q
    log_sums, counts = log_sum_exp_groups(beta_raw, inverse, n_groups)  # [C] each; every group has a sample
    log_zhat = log_sums - torch.log(counts)

    out: dict[str, float] = {}
    for name, h in DIVERGENCE_METRICS.items():
        if log_z is None:
            out[name], out[f"{name}_se"] = _self_normalised(h, alpha, beta_raw, log_zhat, inverse, counts)
        else:
            lz = torch.as_tensor(log_z, dtype=torch.float64)
            if lz.dim() not in (0, 1) or (lz.dim() == 1 and lz.shape != (n,)):
                raise ValueError(f"log_z must be a scalar or [N] = ({n},), got shape {tuple(lz.shape)}")
            if not bool(torch.isfinite(lz).all()):
                raise ValueError("log_z must be finite")
            out[name], out[f"{name}_se"] = _plain_mean(h(alpha, beta_raw - lz, None))
    out["tv_bounded"] = _tv_self_normalised(alpha, beta_raw, inverse, n_groups, counts)
    out["kl_pi_a"], out["kl_pi_a_se"] = _plain_mean(_exp_times(alpha, lp - la))
    for fname, values in (features or {}).items():
        phi = _as_vector(values, n, f"features[{fname!r}]")
        out[f"phi_mean/{fname}"], out[f"phi_mean_se/{fname}"] = _plain_mean(_exp_times(alpha, phi))

    # log Ẑ per context: se(log Ẑ_c) = std_{i∈c}(e^{β̃_i − ℓ̂_c})/√N_c; averaged over contexts.
    rel = _exp_times(beta_raw - log_zhat[inverse], torch.ones(n, dtype=torch.float64))
    var_c = torch.zeros(n_groups, dtype=torch.float64).index_add(0, inverse, (rel - 1.0) ** 2) / counts
    out["log_z_is"] = float(log_zhat.mean())
    out["log_z_is_se"] = float(torch.sqrt((var_c / counts).sum()) / n_groups)
    # ESS per context: (Σ w)²/Σ w² = N_c² Ẑ_c² / Σ w² = N_c² / Σ (w/Ẑ_c)².
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add(0, inverse, rel ** 2)
    ess = torch.where(sq > 0, counts ** 2 / sq, torch.zeros_like(sq))
    out["ess"] = float(ess.sum())
    out["ess_fraction"] = out["ess"] / n
    # ESS_c/N_c = 1/m2_c with m2_c = mean_{i∈c} u_i², u = w/Ẑ_c (mean 1); its influence (delta method on
    # m1²/m2 at m1 = 1): ψ_i = 2(u_i − 1)/m2 − (u_i² − m2)/m2².
    m2 = (sq / counts)[inverse]
    psi = 2.0 * (rel - 1.0) / m2 - (rel ** 2 - m2) / m2 ** 2
    out["ess_fraction_se"] = float(psi.std(unbiased=True) / math.sqrt(n)) if n > 1 and bool(
        torch.isfinite(psi).all()) else math.nan
    return out


def _tv_self_normalised(alpha: torch.Tensor, beta_raw: torch.Tensor, inverse: torch.Tensor, n_groups: int,
                        counts: torch.Tensor) -> float:
    """½ Σ_i |π̂_i − p̂_i| per context (softmax of α and of β̃ within it), averaged with weights N_c/N over the
    contexts that have a sample with P > 0; in [0, 1] by construction (module docstring)."""
    log_pi_sums, _ = log_sum_exp_groups(alpha, inverse, n_groups)
    log_p_sums, _ = log_sum_exp_groups(beta_raw, inverse, n_groups)
    supported = torch.isfinite(log_p_sums)
    if not bool(supported.any()):
        return math.nan
    pi_hat = torch.exp(alpha - log_pi_sums[inverse])
    p_hat = torch.where(supported[inverse], torch.exp(beta_raw - torch.where(supported, log_p_sums, 0.0)[inverse]),
                        torch.zeros_like(beta_raw))
    per_group = torch.zeros(n_groups, dtype=torch.float64).index_add(0, inverse, 0.5 * (pi_hat - p_hat).abs())
    weights = torch.where(supported, counts, torch.zeros_like(counts))
    return float((per_group * weights).sum() / weights.sum())


def _plain_mean(h: torch.Tensor) -> tuple[float, float]:
    value = float(h.mean())
    if not math.isfinite(value) or h.shape[0] < 2:
        return value, math.nan
    return value, float(h.std(unbiased=True) / math.sqrt(h.shape[0]))


def _self_normalised(h: Callable, alpha: torch.Tensor, beta_raw: torch.Tensor, log_zhat: torch.Tensor,
                     inverse: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """mean_i h(α_i, β̃_i − ℓ̂_{c(i)}) and its delta-method standard error (module docstring)."""
    n = alpha.shape[0]
    if not bool(torch.isfinite(log_zhat).all()):
        return math.nan, math.nan  # some context has P = 0 on every sample: p is not estimable there
    ell = log_zhat.clone().requires_grad_(True)
    with torch.enable_grad():
        values = h(alpha, beta_raw - ell[inverse], None)
        theta = values.mean()
        if not bool(torch.isfinite(theta)) or n < 2:
            return float(theta.detach()), math.nan
        (d_ell,) = torch.autograd.grad(theta, ell)
    values, theta = values.detach(), theta.detach()
    rel = _exp_times(beta_raw - log_zhat[inverse], torch.ones_like(alpha))
    psi = values + (n / counts * d_ell)[inverse] * (rel - 1.0)
    return float(theta), float(psi.std(unbiased=True) / math.sqrt(n))


def exact_metrics(*, logp_pi: torch.Tensor, logp_a: torch.Tensor, log_target: torch.Tensor,
                  features: Mapping[str, torch.Tensor] | None = None,
                  logp_q: torch.Tensor | None = None) -> dict[str, float]:
    """The exact values of ``importance_sampled_metrics``'s estimates, from a full enumeration.

    Every argument is [M] over all M sequences of the support (each listed once): log π, log a, log P
    (unnormalised, −inf allowed), features name -> [M] φ; logp_q: [M] log q, only for "ess_fraction"'s
    limit 1/E_q[(p/q)²]. Keys: kl_p_pi, kl_pi_p, tv, js, kl_pi_a, phi_mean/<name>, log_z_is (= log Z),
    ess_fraction (with logp_q).
    """
    lp = _as_vector(logp_pi, None, "logp_pi")
    m = lp.shape[0]
    la = _as_vector(logp_a, m, "logp_a")
    lt = _as_vector(log_target, m, "log_target")
    log_z = torch.logsumexp(lt, 0)
    log_p = lt - log_z
    # The same h as the estimator with q = the counting measure: α = log π, β = log p, summed.
    out = {name: float(h(lp, log_p, None).sum()) for name, h in DIVERGENCE_METRICS.items()}
    out["kl_pi_a"] = float(_exp_times(lp, lp - la).sum())
    for fname, values in (features or {}).items():
        out[f"phi_mean/{fname}"] = float(_exp_times(lp, _as_vector(values, m, f"features[{fname!r}]")).sum())
    out["log_z_is"] = float(log_z)
    if logp_q is not None:
        lq = _as_vector(logp_q, m, "logp_q")
        out["ess_fraction"] = float(torch.exp(-torch.logsumexp(2 * log_p - lq, 0)))
    return out


# ---------------------------------------------------------------------------------------------- diversity

def _tokens(seq) -> tuple[Hashable, ...]:
    """A text is split on whitespace; any other sequence (token ids, tokens) is taken as it is."""
    return tuple(seq.split()) if isinstance(seq, str) else tuple(seq)


def distinct_n(sequences: Sequence, n: int) -> float:
    """Distinct-n: (number of distinct n-grams) / (total number of n-grams) over all sequences together.

    sequences: texts (split on whitespace) or sequences of tokens (e.g. ``Samples.sequences()``). A set with
    no n-gram at all (every sequence shorter than n) gives 0.0.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be ≥ 1, got {n}")
    seen, total = set(), 0
    for seq in sequences:
        toks = _tokens(seq)
        grams = [toks[i:i + n] for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def self_bleu(sequences: Sequence, n: int, *, max_hypotheses: int | None = None, seed: int = 0) -> float:
    """Self-BLEU-n: mean over samples x_i of BLEU-n(x_i; references = all x_j, j ≠ i) (module docstring).

    sequences: ≥ 2 texts (split on whitespace) or token sequences. max_hypotheses: score only this many
    samples, drawn without replacement with ``random.Random(seed)`` (references stay all the others).
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    toks = [list(_tokens(s)) for s in sequences]
    if len(toks) < 2:
        raise ValueError(f"self_bleu needs at least 2 sequences, got {len(toks)}")
    if n < 1:
        raise ValueError(f"self_bleu: n must be ≥ 1, got {n}")
    index = list(range(len(toks)))
    if max_hypotheses is not None and max_hypotheses < len(toks):
        if max_hypotheses < 1:
            raise ValueError(f"self_bleu: max_hypotheses must be ≥ 1, got {max_hypotheses}")
        index = random.Random(seed).sample(index, max_hypotheses)
    smoothing = SmoothingFunction().method1
    weights = (1.0 / n,) * n
    scores = [sentence_bleu(toks[:i] + toks[i + 1:], toks[i], weights=weights, smoothing_function=smoothing)
              for i in index]
    return float(sum(scores) / len(scores))


def diversity_metrics(sequences: Sequence, *, distinct: Sequence[int] = (1, 2, 3), bleu_n: Sequence[int] = (3,),
                      max_hypotheses: int | None = 500, seed: int = 0) -> dict[str, float]:
    """{"distinct_<n>": …, "self_bleu_<n>": …} for the given n (see ``distinct_n`` and ``self_bleu``)."""
    out = {f"distinct_{k}": distinct_n(sequences, k) for k in distinct}
    out.update({f"self_bleu_{k}": self_bleu(sequences, k, max_hypotheses=max_hypotheses, seed=seed)
                for k in bleu_n})
    return out
