"""Running log Z: exact bookkeeping, rank invariance (simulated ranks and a real 2-process gloo group),
per-context estimates, skipped all-zero batches, bad input, state round trips, and consistency on the toy."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdpg_scale.core.collectives import Collective, LocalCollective, TorchDistCollective
from fdpg_scale.core.estimator import LogZEstimator, PerContextLogZ
from fdpg_scale.toy.model import ToyLM, exact_log_z
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


def _reference(batches, n_ctx: int, initial: float = 0.0):
    """log Ẑ(c) after each batch, from the concatenation of every counted sample (float64)."""
    kept_w = [[] for _ in range(n_ctx)]
    values = []
    for lw, ids in batches:
        for c in range(n_ctx):
            mine = lw[ids == c]
            if mine.numel() and bool((mine > NEG_INF).any()):   # a context with no P > 0 is skipped
                kept_w[c].append(mine)
        values.append(torch.tensor([
            float(torch.logsumexp(torch.cat(w), 0) - math.log(sum(x.numel() for x in w))) if w else initial
            for w in kept_w], dtype=torch.float64))
    return values


def _run_ranks(world: int, batches, n_ctx: int | None):
    """Run the estimator on ``world`` simulated ranks (threads), each given its contiguous shard of every
    batch; returns per rank the list of (value, skipped flag) after each batch."""
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
                    flag = est.update(lw_r)
                    trace.append((torch.tensor([est.value], dtype=torch.float64), flag))
                else:
                    flag = est.update(lw_r, ids_r)
                    trace.append((est.value.clone(), flag.clone()))
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
    counted = sum(lw.numel() for lw, _ in batches if bool((lw > NEG_INF).any()))
    assert est.count == counted
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
            for step, ((v, flag), (v1, flag1), expected) in enumerate(zip(trace, one, ref)):
                assert torch.all(torch.isfinite(v))
                assert_close(v, v1, rtol=1e-14, atol=1e-13, name=f"world {world} rank {rank} step {step}")
                assert_close(v, expected, rtol=1e-13, atol=1e-12, name=f"reference, step {step}")
                assert (torch.as_tensor(flag) == torch.as_tensor(flag1)).all()


def _gloo_worker(rank: int, world: int, init_file: str, out_file: str, batches) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        coll = TorchDistCollective()
        assert coll.world_size == world
        est, per_ctx = LogZEstimator(collective=coll), PerContextLogZ(3, collective=coll)
        values, ctx_values, flags = [], [], []
        for lw, ids in batches:
            lw_r, ids_r = torch.tensor_split(lw, world)[rank], torch.tensor_split(ids, world)[rank]
            flags.append(est.update(lw_r))
            per_ctx.update(lw_r, ids_r)
            values.append(est.value)
            ctx_values.append(per_ctx.value.clone())
        torch.save({"values": values, "ctx": ctx_values, "flags": flags}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_rank_invariance_real_gloo_two_processes(tmp_path):
    batches = _batches(seed=1)
    out = str(tmp_path / "result")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rendezvous"), out, batches), nprocs=2, join=True)
    # The same global batches in one process.
    est, per_ctx = LogZEstimator(collective=LocalCollective()), PerContextLogZ(3)
    want_v, want_ctx, want_flags = [], [], []
    for lw, ids in batches:
        want_flags.append(est.update(lw))
        per_ctx.update(lw, ids)
        want_v.append(est.value)
        want_ctx.append(per_ctx.value.clone())
    assert any(want_flags) and not all(want_flags)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for rank, got in enumerate(results):
        assert got["flags"] == want_flags
        for step in range(len(batches)):
            assert math.isclose(got["values"][step], want_v[step], rel_tol=1e-14, abs_tol=1e-13), (rank, step)
            assert_close(got["ctx"][step], want_ctx[step], rtol=1e-14, atol=1e-13,
                         name=f"rank {rank} per-context step {step}")
    assert results[0]["values"] == results[1]["values"]                   # every rank holds the same value
    assert all(torch.equal(a, b) for a, b in zip(results[0]["ctx"], results[1]["ctx"]))


def test_all_zero_batch_is_skipped_without_nan():
    est = LogZEstimator()
    assert est.update(torch.full((5,), NEG_INF)) is True                  # before any estimate
    assert est.value == 0.0 and est.count == 0 and est.skipped_batches == 1
    assert est.update(torch.tensor([0.5, NEG_INF, -1.0])) is False
    value, count = est.value, est.count
    assert count == 3 and math.isfinite(value)
    assert est.update(torch.full((4,), NEG_INF, dtype=torch.float64)) is True
    assert est.value == value and est.count == count and est.skipped_batches == 2
    assert est.update(torch.zeros(0)) is True                              # an empty batch changes nothing
    assert est.value == value


def test_per_context_values_and_flags():
    est = PerContextLogZ(3, initial=-1.0)
    lw = torch.tensor([0.0, 1.0, NEG_INF, 2.0, NEG_INF], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2])
    skipped = est.update(lw, ids)
    assert skipped.tolist() == [False, True, False]                      # context 1: its only sample has P = 0
    expected = torch.tensor([math.log((1 + math.e) / 2), -1.0, math.log(math.exp(2.0) / 2)], dtype=torch.float64)
    assert_close(est.value, expected, rtol=1e-14, atol=1e-14, name="log Z(c)")
    assert torch.equal(est.values_for(torch.tensor([2, 0, 1, 1])), est.value[[2, 0, 1, 1]])
    before = est.value.clone()
    skipped = est.update(torch.tensor([NEG_INF, 5.0]), torch.tensor([0, 1]))
    assert skipped.tolist() == [True, False, True]                       # 0 all-zero, 2 absent
    assert est.value[0] == before[0] and est.value[2] == before[2]
    assert math.isclose(float(est.value[1]), 5.0, rel_tol=1e-14)          # first positive sample of context 1


def test_state_dict_round_trip_through_json():
    batches = _batches(seed=3)
    a, b = PerContextLogZ(3), PerContextLogZ(3)
    for lw, ids in batches[:4]:
        a.update(lw, ids)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for lw, ids in batches[4:]:
        assert torch.equal(a.update(lw, ids), b.update(lw, ids))
        assert torch.equal(a.value, b.value)
    s, t = LogZEstimator(), LogZEstimator()
    s.update(torch.tensor([1.0, 2.0]))
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.value == s.value and t.count == s.count
    with pytest.raises(ValueError, match="num_contexts = 2"):
        PerContextLogZ(2).load_state_dict(a.state_dict())


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
