"""Grouped log-mean-exp (core.logspace) against a naive float64 oracle, including −inf groups and ranks."""

import math

import pytest
import torch

from fdpg_scale.core.collectives import LocalCollective
from fdpg_scale.core.logspace import context_groups, log_mean_exp_groups, log_sum_exp_groups


def naive(x, groups, n):
    """log((1/N_c) Σ_{i∈c} e^{x_i}) by plain float64 arithmetic (fine for moderate x)."""
    out = []
    for c in range(n):
        vals = [v for v, g in zip(x.tolist(), groups.tolist()) if g == c]
        total = sum(math.exp(v) for v in vals)
        out.append(math.log(total / len(vals)) if total > 0 else -math.inf)
    return torch.tensor(out, dtype=torch.float64)


def test_matches_naive_and_survives_large_and_minus_inf_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    groups = torch.randint(0, 4, (50,), generator=gen)
    assert torch.allclose(log_mean_exp_groups(x, groups, 4), naive(x, groups, 4), atol=1e-12)
    # Shifted by 1000: exp overflows naively; the result shifts by exactly 1000.
    assert torch.allclose(log_mean_exp_groups(x + 1000, groups, 4), naive(x, groups, 4) + 1000, atol=1e-9)
    # A group whose every term is −inf (all samples outside the support) gives −inf, not NaN.
    y = x.clone()
    y[groups == 2] = -math.inf
    out = log_mean_exp_groups(y, groups, 4)
    assert out[2] == -math.inf and torch.isfinite(out[[0, 1, 3]]).all()
    log_sums, counts = log_sum_exp_groups(y, groups, 5)  # group 4 is empty
    assert counts.tolist() == [float((groups == c).sum()) for c in range(5)] and log_sums[4] == -math.inf


class SumOfTwoRanks(LocalCollective):
    """Simulates a second rank holding ``other``'s statistics: reductions combine this rank's with it."""

    def __init__(self, other_x, other_groups, n):
        self.other = (other_x, other_groups, n)
        self.calls = []

    def all_reduce_max(self, t):
        x, g, n = self.other
        m = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, g, x, "amax", include_self=True)
        self.calls.append("max")
        self.shift = torch.where(torch.isfinite(torch.maximum(t, m)), torch.maximum(t, m), torch.zeros_like(m))
        return torch.maximum(t, m)

    def all_reduce_sum(self, t):
        x, g, n = self.other
        other = torch.zeros(2, n, dtype=torch.float64)
        other[0].index_add_(0, g, torch.exp(x - self.shift[g]))
        other[1].index_add_(0, g, torch.ones_like(x))
        self.calls.append("sum")
        return t + other


def test_collective_reduces_over_ranks_with_one_shift():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, generator=gen, dtype=torch.float64)
    x[:20] += 50  # the first rank's weights dwarf the second's: a per-rank shift would lose the second's
    groups = torch.randint(0, 3, (40,), generator=gen)
    coll = SumOfTwoRanks(x[20:], groups[20:], 3)
    got = log_mean_exp_groups(x[:20], groups[:20], 3, collective=coll)
    assert coll.calls == ["max", "sum"]
    assert torch.allclose(got, log_mean_exp_groups(x, groups, 3), atol=1e-12)


def test_context_groups():
    unique, inverse = context_groups(torch.tensor([7, 3, 7, 3, 9]), 5)
    assert unique.tolist() == [3, 7, 9] and inverse.tolist() == [1, 0, 1, 0, 2]
    with pytest.raises(ValueError, match=r"context_ids must be \[B\]"):
        context_groups(torch.tensor([0, 1]), 3)
