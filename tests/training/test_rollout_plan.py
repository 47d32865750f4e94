"""RolloutPlan (training/rollout.py): the rollout's settings in one frozen record, checked when built, and
derived from a run config as the trainer derives it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fdpg_scale.distributed.settings import SamplingSettings
from fdpg_scale.training.config import load_config
from fdpg_scale.training.rollout import FIT_STREAM, TRAIN_STREAM, RolloutPlan

ROOT = Path(__file__).resolve().parents[2]


def _plan(**changes) -> RolloutPlan:
    return RolloutPlan(**({"settings": SamplingSettings(), "run_seed": 0, "accumulation": 2, "micro_batch": 2}
                          | changes))


def test_plan_from_a_run_config():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.global_batch=8", "train.micro_batch=2", "seed=11",
                                                    "sampling.batch=4", "sampling.temperature=0.7",
                                                    "sampling.rescore_logq=false"])
    plan = RolloutPlan.from_config(cfg, rank=1, world=2)
    assert plan == RolloutPlan(settings=cfg.sampling.sampling_settings(), mode=cfg.sampling.generation_mode,
                               run_seed=11, rank=1, world=2, accumulation=2, micro_batch=2, sampling_batch=4,
                               rescore_logq=False, stream=TRAIN_STREAM, recorded_logq_exact=True)  # fp32, CPU
    assert plan.sequences == 4 and plan.layout() == [1]           # one chunk of 4: global chunk 1 of 0..1
    assert type(plan.settings) is SamplingSettings and plan.settings.temperature == 0.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rank = 0


def test_recorded_logq_is_trusted_only_from_generate_in_fp32():
    """Skipping the rescoring forward is exact for generate's fp32 CPU numerics only: vLLM's kernels record log q
    about 1e-3 away, and bf16 rounds the logits, so those are rescored."""
    def exact(*overrides):
        cfg = load_config(ROOT / "configs/smoke.yaml", list(overrides))
        return RolloutPlan.from_config(cfg, rank=0, world=1).recorded_logq_exact

    assert exact()
    assert not exact("sampling.engine=vllm")
    assert not exact("model.dtype=bf16")


def test_the_global_batch_is_laid_out_the_same_on_any_world_size():
    """Chunk c lives on rank c mod world: 1 rank draws chunks 0..3, 2 ranks split them (0, 2) and (1, 3)."""
    one = _plan(accumulation=4, micro_batch=2)
    two = [_plan(rank=r, world=2, accumulation=2, micro_batch=2) for r in (0, 1)]
    assert one.layout() == [0, 1, 2, 3]
    assert [p.layout() for p in two] == [[0, 2], [1, 3]]
    assert sorted(one.layout()) == sorted(two[0].layout() + two[1].layout())


@pytest.mark.parametrize("changes, error, message", [
    ({"settings": {"temperature": 1.0}}, TypeError, "settings must be a SamplingSettings, got dict"),
    ({"mode": "scattered"}, ValueError, "mode must be one of gathered, sharded, got 'scattered'"),
    ({"rank": 2, "world": 2}, ValueError, r"rank must be in \[0, world=2\), got 2"),
    ({"accumulation": 0}, ValueError, "accumulation must be >= 1, got 0"),
    ({"micro_batch": 0}, ValueError, "micro_batch must be >= 1, got 0"),
    ({"sampling_batch": 3}, ValueError, "sampling.batch=3 must be a multiple of train.micro_batch=2"),
    ({"sampling_batch": 8}, ValueError, "that divides the 4 sequences each of the 1 ranks samples per step"),
])
def test_a_bad_plan_is_refused_when_built(changes, error, message):
    with pytest.raises(error, match=message):
        _plan(**changes)


def test_the_fit_plan_is_the_training_plan_on_its_own_stream():
    plan = _plan(sampling_batch=4, rescore_logq=False)
    fit = dataclasses.replace(plan, accumulation=3, stream=FIT_STREAM, sampling_batch=None, rescore_logq=True)
    assert fit.layout() == [0, 1, 2] and fit.stream != plan.stream and fit.settings is plan.settings
