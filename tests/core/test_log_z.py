"""Running log Z: exact bookkeeping, rank invariance (simulated ranks and a real 2-process gloo group),
per-context estimates, every sample counted (zeros included), bad input, state round trips, and Ẑ/Z → 1 on an
enumerable toy for batch sizes 1, 8, 32 and for a conditional target with one sample per context per step."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.distributed as dist

from fdpg_scale.core.collectives import Collective, LocalCollective, TorchDistCollective
from fdpg_scale.core.estimator import LogZEstimator, PerContextLogZ
from fdpg_scale.toy.model import ToyLM, exact_log_z
from tests.harness import run_ranks
from tests.helpers import assert_close

NEG_INF = -math.inf


class SimulatedGroup:
    """``world`` ranks as threads of one process: each all-reduce waits for every rank's tensor, then each
    rank combines all of them in rank order (what a real collective returns)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world

    def member(self, rank: int) -> "Collective":
        group = self

        class _Member:
            world_size = group.world

            def _reduce(self, t, combine):
                group.slots[rank] = t.detach().clone()
                group.barrier.wait()
                out = group.slots[0].clone()
                for other in group.slots[1:]:
                    out = combine(out, other)
                group.barrier.wait()            # every rank has read the slots before they are reused
                return out

            def all_reduce_sum(self, t):
                return self._reduce(t, torch.add)

            def all_reduce_max(self, t):
                return self._reduce(t, torch.maximum)

        return _Member()


def _batches(seed: int = 0, n_ctx: int = 3):
    """A sequence of (log_w [B], context ids [B]) with wide spreads, −inf entries, an all-zero batch, a batch
    with a single positive weight, and uneven sizes (some rank shards empty when split 4 ways)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, offset in [(16, 0.0), (7, 40.0), (3, -25.0), (0, 0.0), (12, 5.0), (9, -60.0), (16, 10.0)]:
        lw = torch.randn(b, generator=g, dtype=torch.float64) * 15 + offset
        lw[torch.rand(b, generator=g) < 0.3] = NEG_INF
        out.append((lw, torch.randint(0, n_ctx, (b,), generator=g)))
    out.insert(3, (torch.full((8,), NEG_INF, dtype=torch.float64), torch.randint(0, n_ctx, (8,), generator=g)))
    single = torch.full((10,), NEG_INF, dtype=torch.float64)
    single[9] = 3.0                                    # on the last rank's shard only
    out.insert(5, (single, torch.zeros(10, dtype=torch.long)))
    return out


def _reference(batches, n_ctx: int):
    """log Ẑ(c) after each batch, from the concatenation of every sample so far (float64; −inf: no P > 0 yet)."""
    kept_w = [[] for _ in range(n_ctx)]
    values = []
    for lw, ids in batches:
        for c in range(n_ctx):
            kept_w[c].append(lw[ids == c])                      # every sample counts, P = 0 included
        values.append(torch.tensor([
            float(torch.logsumexp(torch.cat(w), 0) - math.log(max(1, sum(x.numel() for x in w))))
            for w in kept_w], dtype=torch.float64))
    return values


def _assert_same(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float, name: str) -> None:
    """Equal −inf pattern (contexts without an estimate), finite entries close."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: {got} vs {want}"
    fin = torch.isfinite(want)
    assert_close(got[fin], want[fin], rtol=rtol, atol=atol, name=name)


def _run_ranks(world: int, batches, n_ctx: int | None):
    """Run the estimator on ``world`` simulated ranks (threads), each given its contiguous shard of every
    batch; returns per rank the list of (value, sample count) after each batch."""
    group = SimulatedGroup(world)
    results: list = [None] * world
    errors: list = []

    def worker(rank: int):
        try:
            coll = group.member(rank)
            est = LogZEstimator(collective=coll) if n_ctx is None else PerContextLogZ(n_ctx, collective=coll)
            trace = []
            for lw, ids in batches:
                lw_r = torch.tensor_split(lw, world)[rank]
                ids_r = torch.tensor_split(ids, world)[rank]
                if n_ctx is None:
                    est.update(lw_r)
                    trace.append((torch.tensor([est.value], dtype=torch.float64), est.count))
                else:
                    est.update(lw_r, ids_r)
                    trace.append((est.value.clone(), est.count.clone()))
            results[rank] = trace
        except BaseException as e:  # surfaced below; a failing rank must not leave the others waiting
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_matches_the_direct_running_mean():
    batches = [(lw, torch.zeros_like(ids)) for lw, ids in _batches()]
    est = LogZEstimator()
    for (lw, _), expected in zip(batches, _reference(batches, 1)):
        est.update(lw)
        assert math.isclose(est.value, float(expected[0]), rel_tol=1e-13, abs_tol=1e-12)
    assert est.count == sum(lw.numel() for lw, _ in batches)             # every sample, zeros included
    # float32 input is accumulated in float64: the same as feeding its float64 image.
    lw32 = batches[0][0].to(torch.float32)
    a, b = LogZEstimator(), LogZEstimator()
    a.update(lw32)
    b.update(lw32.to(torch.float64))
    assert a.value == b.value


@pytest.mark.parametrize("n_ctx", [None, 3], ids=["global", "per-context"])
def test_rank_invariance_simulated(n_ctx):
    batches = _batches()
    if n_ctx is None:
        ref = [v[:1] for v in _reference([(lw, torch.zeros_like(ids)) for lw, ids in batches], 1)]
    else:
        ref = _reference(batches, n_ctx)
    one = _run_ranks(1, batches, n_ctx)[0]
    for world in (2, 4):
        traces = _run_ranks(world, batches, n_ctx)
        for rank, trace in enumerate(traces):
            for step, ((v, count), (v1, count1), expected) in enumerate(zip(trace, one, ref)):
                _assert_same(v, v1, rtol=1e-14, atol=1e-13, name=f"world {world} rank {rank} step {step}")
                _assert_same(v, expected, rtol=1e-13, atol=1e-12, name=f"reference, step {step}")
                assert (torch.as_tensor(count) == torch.as_tensor(count1)).all()


def _gloo_rank(rank: int, batches) -> dict:
    """This rank's running log Ẑ over its share of every global batch, all-reduced with the other rank's."""
    world = dist.get_world_size()
    coll = TorchDistCollective()
    assert coll.world_size == world
    est, per_ctx = LogZEstimator(collective=coll), PerContextLogZ(3, collective=coll)
    values, ctx_values, counts = [], [], []
    for lw, ids in batches:
        lw_r, ids_r = torch.tensor_split(lw, world)[rank], torch.tensor_split(ids, world)[rank]
        est.update(lw_r)
        per_ctx.update(lw_r, ids_r)
        values.append(est.value)
        counts.append(est.count)
        ctx_values.append(per_ctx.value.clone())
    return {"values": values, "ctx": ctx_values, "counts": counts}


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_rank_invariance_real_gloo_two_processes():
    batches = _batches(seed=1)
    results = run_ranks(_gloo_rank, 2, batches)
    # The same global batches in one process.
    est, per_ctx = LogZEstimator(collective=LocalCollective()), PerContextLogZ(3)
    want_v, want_ctx, want_counts = [], [], []
    for lw, ids in batches:
        est.update(lw)
        per_ctx.update(lw, ids)
        want_v.append(est.value)
        want_counts.append(est.count)
        want_ctx.append(per_ctx.value.clone())
    for rank, got in enumerate(results):
        assert got["counts"] == want_counts
        for step in range(len(batches)):
            assert math.isclose(got["values"][step], want_v[step], rel_tol=1e-14, abs_tol=1e-13), (rank, step)
            _assert_same(got["ctx"][step], want_ctx[step], rtol=1e-14, atol=1e-13,
                         name=f"rank {rank} per-context step {step}")
    assert results[0]["values"] == results[1]["values"]                   # every rank holds the same value
    assert all(torch.equal(a, b) for a, b in zip(results[0]["ctx"], results[1]["ctx"]))


def test_all_zero_batches_count_every_sample():
    est = LogZEstimator()
    est.update(torch.full((5,), NEG_INF))                                 # before any estimate
    assert est.value == NEG_INF and est.count == 5                       # no estimate yet, but 5 samples seen
    est.update(torch.tensor([0.5, NEG_INF, -1.0]))
    assert est.count == 8
    assert math.isclose(est.value, math.log((math.exp(0.5) + math.exp(-1.0)) / 8), rel_tol=1e-14)
    value = est.value
    est.update(torch.full((4,), NEG_INF, dtype=torch.float64))         # zeros lower the mean: 12 samples now
    assert est.count == 12 and math.isclose(est.value, value + math.log(8 / 12), rel_tol=1e-14)
    before = est.value
    est.update(torch.zeros(0))                                            # an empty batch changes nothing
    assert est.value == before and est.count == 12


def test_per_context_values_and_counts():
    est = PerContextLogZ(3)
    lw = torch.tensor([0.0, 1.0, NEG_INF, 2.0, NEG_INF], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2])
    counts = est.update(lw, ids)
    assert counts.tolist() == [2.0, 1.0, 2.0]
    assert est.has_estimate.tolist() == [True, False, True]              # context 1: its only sample has P = 0
    expected = torch.tensor([math.log((1 + math.e) / 2), NEG_INF, math.log(math.exp(2.0) / 2)], dtype=torch.float64)
    _assert_same(est.value, expected, rtol=1e-14, atol=1e-14, name="log Z(c)")
    assert torch.equal(est.values_for(torch.tensor([2, 0, 1, 1])), est.value[[2, 0, 1, 1]])
    before = est.value.clone()
    est.update(torch.tensor([NEG_INF, 5.0], dtype=torch.float64), torch.tensor([0, 1]))
    assert est.count.tolist() == [3.0, 2.0, 2.0]
    assert math.isclose(float(est.value[0]), float(before[0]) + math.log(2 / 3), rel_tol=1e-14)  # a zero counted
    assert est.value[2] == before[2]                                                              # absent: unchanged
    assert math.isclose(float(est.value[1]), 5.0 - math.log(2), rel_tol=1e-14)  # its earlier zero counts too


# ---------------------------------------------------------------------------- unbiased on an enumerable toy
def _rare_constraint(q: ToyLM, rate: float, seed: int) -> torch.Tensor:
    """bool [N]: a random set of light sequences (q < rate/20 each) whose q-mass is just above ``rate``."""
    log_q = q.log_prob_all().detach()
    order = torch.randperm(q.num_sequences, generator=torch.Generator().manual_seed(seed))
    order = order[log_q[order].exp() < rate / 20]
    mass = torch.cumsum(log_q[order].exp(), 0)
    chosen = order[: int(torch.searchsorted(mass, torch.tensor(rate, dtype=mass.dtype))) + 1]
    b = torch.zeros(q.num_sequences, dtype=torch.bool)
    b[chosen] = True
    return b


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_z_hat_over_z_tends_to_one_for_every_batch_size(batch):
    """A constraint q meets 2.7% of the time: counting only batches with a hit gave Ẑ/Z = 5.0 at batch 8 and
    1.7 at batch 32. Every sample counts now, so Ẑ/Z → 1 within Monte Carlo error whatever the batch."""
    q = ToyLM(3, 4, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    b = _rare_constraint(q, 0.027, seed=1)
    log_P = torch.where(b, q.log_prob_all().detach() + 0.4, torch.full((q.num_sequences,), NEG_INF,
                                                                        dtype=torch.float64))
    n = 4_000 if batch == 1 else 40_000 // batch * batch     # one update per sample at batch 1: fewer
    x = q.sample(n, torch.Generator().manual_seed(2 + batch))
    log_w = log_P[q.sequence_index(x)] - q.log_prob(x).detach()
    est = LogZEstimator()
    for lw in log_w.split(batch):
        est.update(lw)
    rate = float(q.log_prob_all().detach()[b].exp().sum())
    assert 0.027 <= rate < 0.03
    ratio = math.exp(est.value - float(exact_log_z(log_P)))
    se = math.sqrt((1 - rate) / (rate * n))                                # relative se of Ẑ (P/q = e^0.4 on b)
    assert abs(ratio - 1) < 4 * se, (ratio, se)
    assert se < 0.1                                                        # the check has teeth (old: 37, 5.0, 1.7)


def test_z_hat_over_z_conditional_one_sample_per_context_per_step():
    """One sample per context per step: skipping contexts without a hit gave Ẑ(c)/Z(c) = 1/rate ≈ 37."""
    n_ctx, steps = 12, 3_000
    q = ToyLM(3, 4, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    log_q_all = q.log_prob_all().detach()
    tables = []
    for c in range(n_ctx):                                                # each context its own rare constraint
        b = _rare_constraint(q, 0.027, seed=10 + c)
        tables.append(torch.where(b, log_q_all + 0.1 * c, torch.full_like(log_q_all, NEG_INF)))
    log_P = torch.stack(tables)                                           # [C, N]
    x = q.sample(n_ctx * steps, torch.Generator().manual_seed(3))
    idx = q.sequence_index(x).view(steps, n_ctx)
    lq = q.log_prob(x).detach().view(steps, n_ctx)
    ctx = torch.arange(n_ctx)
    est = PerContextLogZ(n_ctx)
    for s in range(steps):
        est.update(log_P[ctx, idx[s]] - lq[s], ctx)
    exact = torch.stack([exact_log_z(t) for t in tables])
    ratio = (est.value - exact).exp()
    rates = torch.stack([log_q_all[t > NEG_INF].exp().sum() for t in tables])
    se = ((1 - rates) / (rates * steps)).sqrt()
    assert bool(((ratio - 1).abs() < 5 * se).all()), (ratio, se)
    pooled_se = float(se.pow(2).mean().sqrt()) / math.sqrt(n_ctx)
    assert abs(float(ratio.mean()) - 1) < 4 * pooled_se, (float(ratio.mean()), pooled_se)
    assert float(se.max()) < 0.15                                          # teeth: the old estimator gave ≈ 37


def test_state_dict_round_trip_through_json():
    batches = _batches(seed=3)
    a, b = PerContextLogZ(3), PerContextLogZ(3)
    for lw, ids in batches[:4]:
        a.update(lw, ids)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for lw, ids in batches[4:]:
        assert torch.equal(a.update(lw, ids), b.update(lw, ids))
        assert torch.equal(a.value, b.value) and torch.equal(a.count, b.count)
    s, t = LogZEstimator(), LogZEstimator()
    s.update(torch.tensor([1.0, 2.0]))
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.value == s.value and t.count == s.count
    with pytest.raises(ValueError, match="num_contexts = 2"):
        PerContextLogZ(2).load_state_dict(a.state_dict())
    assert json.loads(json.dumps(LogZEstimator().state_dict()))["log_sum"] == [NEG_INF]  # −inf survives JSON


def test_bad_input_is_named():
    est, pc = LogZEstimator(), PerContextLogZ(2)
    with pytest.raises(ValueError, match=r"log_w\[1\] = nan"):
        est.update(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match=r"log_w\[0\] = inf"):
        est.update(torch.tensor([math.inf]))
    with pytest.raises(ValueError, match=r"log_w must be a vector \[B\], got shape \[2, 2\]"):
        est.update(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="log_w must be a floating-point"):
        est.update(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"context_ids must lie in \[0, 2\)"):
        pc.update(torch.zeros(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"context_ids has shape \[3\], expected \[2\]"):
        pc.update(torch.zeros(2), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="context_ids must be int64"):
        pc.update(torch.zeros(2), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_contexts"):
        PerContextLogZ(0)
    assert est.count == 0 and pc.count.sum() == 0                        # rejected batches changed nothing


def test_consistent_for_the_toy_target_across_changing_proposals():
    """Each P/q term is unbiased for Z whatever q drew it: switching q halfway still converges to log Z."""
    base = ToyLM(3, 4, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    seqs = base.all_sequences()
    log_P = base.log_prob_all().detach() + 0.7 * (seqs == 1).sum(1).double() + 2.0
    gen = torch.Generator().manual_seed(1)
    est, all_w = LogZEstimator(), []
    for q_seed in (0, 5):
        q = ToyLM(3, 4, init_scale=0.5, generator=torch.Generator().manual_seed(q_seed))
        for _ in range(20):
            x = q.sample(500, gen)
            lw = log_P[q.sequence_index(x)] - q.log_prob(x).detach()
            est.update(lw)
            all_w.append(lw.exp())
    w = torch.cat(all_w)
    rel_se = float(w.std() / w.mean()) / math.sqrt(w.numel())            # se(Ẑ)/Ẑ ≈ se(log Ẑ)
    err = est.value - float(exact_log_z(log_P))
    assert abs(err) < 4 * rel_se, (err, rel_se)
    assert rel_se < 0.02                                                 # the check has teeth
