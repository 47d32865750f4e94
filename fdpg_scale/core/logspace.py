"""Grouped reductions in log space: per-context log-sum-exp and log-mean-exp of per-sample log-weights.

Conditional targets have one partition function Z(c) per context c, estimated from the samples of that
context only. ``context_groups`` numbers the contexts of a batch 0 … C−1; ``log_sum_exp_groups`` and
``log_mean_exp_groups`` reduce a vector of log-weights x [N] per group without leaving log space:

    log Σ_{i∈c} e^{x_i} = m_c + log Σ_{i∈c} e^{x_i − m_c},     m_c = max_{i∈c} x_i,

so no term overflows, and a group whose terms are all −inf (every sample outside the target's support)
gives −inf, not NaN (its shift is taken as 0). With a ``Collective`` the max and the sums are all-reduced,
the max first, so that every rank exponentiates relative to the same global shift and all ranks get the
same result whatever the world size.
"""

from __future__ import annotations

import math

import torch

from fdpg_scale.core.collectives import Collective, LocalCollective

__all__ = ["context_groups", "log_sum_exp_groups", "log_mean_exp_groups"]


def context_groups(context_ids: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group a batch by context for conditional targets (one Z(c) per context).

    context_ids: LongTensor [B] or None (unconditional: one group). Returns (unique [C], inverse [B]) with
    ``unique[inverse] == context_ids``; reduce per context over ``inverse`` (``log_mean_exp_groups``).
    """
    if context_ids is None:
        return torch.zeros(1, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long)
    if context_ids.shape != (batch_size,):
        raise ValueError(f"context_groups: context_ids must be [B] = ({batch_size},), got {tuple(context_ids.shape)}")
    unique, inverse = torch.unique(context_ids, return_inverse=True)
    return unique, inverse


def log_sum_exp_groups(x: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                       collective: Collective | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, log Σ_{i∈c} e^{x_i} and the number of terms: (float64 [C], float64 [C]).

    x: [N] log-weights (−inf allowed); groups: int64 [N] in 0 … num_groups−1. A group with no term has
    log-sum −inf and count 0. With ``collective``, sums run over every rank's samples (a collective call).
    """
    if x.dim() != 1 or groups.shape != x.shape:
        raise ValueError(f"x and groups must be [N] vectors of one length, got {tuple(x.shape)} and "
                         f"{tuple(groups.shape)}")
    collective = collective if collective is not None else LocalCollective()
    lx = x.detach().to(torch.float64).cpu()
    g = groups.detach().cpu()
    local_max = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, g, lx, "amax", include_self=True)
    m = collective.all_reduce_max(local_max)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all −inf: exp(−inf − 0) = 0, no NaN
    local = torch.zeros(2, num_groups, dtype=torch.float64)
    local[0].index_add_(0, g, torch.exp(lx - shift[g]))
    local[1].index_add_(0, g, torch.ones_like(lx))
    total = collective.all_reduce_sum(local)
    return torch.log(total[0]) + shift, total[1]


def log_mean_exp_groups(x: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                        collective: Collective | None = None) -> torch.Tensor:
    """float64 [C]: log((1/N_c) Σ_{i∈c} e^{x_i}) per group (−inf where every term is −inf; NaN for an empty
    group, which has no mean). Arguments as ``log_sum_exp_groups``."""
    log_sums, counts = log_sum_exp_groups(x, groups, num_groups, collective=collective)
    return log_sums - torch.log(counts)
