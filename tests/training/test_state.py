"""TrainerState (training/state.py): built from the config, saved and restored through a weights-only
checkpoint file, and its log Z shared by the ranks of a process group (two forked gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.core.collectives import LocalCollective, TorchDistCollective
from fdpg_scale.training.config import load_config
from fdpg_scale.training.state import TrainerState
from tests.harness import SMOKE, run_ranks


def config(*overrides: str):
    return load_config(SMOKE, list(overrides))


def test_fresh_state_follows_the_config():
    cfg = config("train.proposal_update_interval=4", "train.proposal_update_metric=tv", "train.proposal_min_samples=64",
                 "train.baseline_momentum=0.5")
    state = TrainerState.fresh(cfg, num_contexts=3)
    assert state.step == 0 and state.proposal_version == 0 and state.lambdas is None
    assert state.log_z.num_contexts == 3 and isinstance(state.log_z.collective, LocalCollective)
    assert state.baseline.momentum == 0.5 and state.baseline.enabled
    schedule = state.proposal_schedule
    assert (schedule.interval, schedule.metric, schedule.min_samples) == (4, "tv", 64)
    assert TrainerState.fresh(config("train.on_policy=true")).proposal_schedule is None   # no q to replace
    assert not TrainerState.fresh(config("train.baseline=false")).baseline.enabled


def advanced(cfg) -> TrainerState:
    """A state some steps into a run: every part moved away from its start."""
    state = TrainerState.fresh(cfg, num_contexts=2)
    state.log_z.update(torch.tensor([-1.0, -math.inf, 0.5], dtype=torch.float64), torch.tensor([0, 1, 1]))
    state.baseline.update(torch.tensor([0.25, -0.75]))
    state.proposal_schedule.observe(logp_pi=torch.tensor([-1.0, -2.0]), logp_q=torch.tensor([-1.5, -2.5]),
                                    log_target=torch.tensor([-3.0, -math.inf]), context_ids=torch.tensor([0, 1]))
    state.step, state.proposal_version, state.lambdas = 7, 2, [0.5, -1.25]
    return state


def test_state_dict_round_trips_through_a_weights_only_file(tmp_path):
    cfg = config()
    saved = advanced(cfg)
    torch.save(saved.state_dict(), tmp_path / "trainer_state.pt")
    loaded = TrainerState.fresh(cfg, num_contexts=2)
    loaded.load_state_dict(torch.load(tmp_path / "trainer_state.pt", weights_only=True))
    assert loaded.state_dict() == saved.state_dict()
    assert loaded.step == 7 and loaded.proposal_version == 2 and loaded.lambdas == [0.5, -1.25]
    assert loaded.proposal_schedule.pending == 2
    assert torch.equal(loaded.log_z.value, saved.log_z.value)


def test_an_on_policy_checkpoint_resumes_off_policy_with_a_fresh_schedule():
    on = TrainerState.fresh(config("train.on_policy=true"))
    on.step = 3
    off = TrainerState.fresh(config())
    off.load_state_dict(on.state_dict())
    assert off.step == 3 and off.proposal_schedule is not None and off.proposal_schedule.pending == 0


def test_a_state_of_another_number_of_contexts_is_refused():
    saved = advanced(config())
    with pytest.raises(ValueError, match="num_contexts = 3"):
        TrainerState.fresh(config(), num_contexts=3).load_state_dict(saved.state_dict())


def _log_z_on_rank(rank: int) -> tuple[str, list[float], list[float]]:
    state = TrainerState.fresh(config(), num_contexts=2)
    mine = {0: ([-1.0, 0.25], [0, 1]), 1: ([-math.inf, 2.0, -0.5], [1, 1, 0])}[rank]
    state.log_z.update(torch.tensor(mine[0], dtype=torch.float64), torch.tensor(mine[1]))
    return type(state.log_z.collective).__name__, state.log_z.value.tolist(), state.log_z.count.tolist()


def test_under_a_process_group_log_z_is_estimated_over_every_rank_s_samples():
    (kind0, value0, count0), (kind1, value1, count1) = run_ranks(_log_z_on_rank, 2)
    assert kind0 == kind1 == TorchDistCollective.__name__
    assert value0 == value1 and count0 == count1 == [2.0, 3.0]
    one = TrainerState.fresh(config(), num_contexts=2)            # one process holding both ranks' samples
    one.log_z.update(torch.tensor([-1.0, 0.25, -math.inf, 2.0, -0.5], dtype=torch.float64),
                     torch.tensor([0, 1, 1, 1, 0]))
    assert value0 == pytest.approx(one.log_z.value.tolist(), rel=1e-12, abs=1e-12)
