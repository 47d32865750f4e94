"""configs/llama-7b.yaml's micro-batch is the one the planner chooses: the largest that fits 80 GB GPUs on the
8- and 16-GPU layouts the config names, i.e. the fewest ZeRO-3 all-gathers per step."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdpg_scale.apps.plan import GIB, load_architecture, plan_memory, resolve_architecture_file
from fdpg_scale.errors import ConfigError
from fdpg_scale.training.config import load_config
from fdpg_scale.training.run_setup import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/llama-7b.yaml"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def plan_for(micro_batch: int, gpus: int):
    """The plan at this micro-batch, or None when the batch layout does not allow it on ``gpus`` GPUs."""
    try:
        cfg = load_config(CONFIG, [f"train.micro_batch={micro_batch}"])
        cfg.sampling_batch(gpus)
        ds = deepspeed_config(cfg, world_size=gpus, accumulation=cfg.train.accumulation_steps(gpus))
    except ConfigError:
        return None
    arch = load_architecture(resolve_architecture_file(cfg, CONFIG, None))
    return plan_memory(cfg, arch, nodes=1, gpus_per_node=gpus, prompt_tokens=64, ds_config=ds,
                       gpu_memory_gib=80, reserve_gib=4)


def test_llama_7b_micro_batch_is_the_largest_that_fits_both_layouts():
    chosen = load_config(CONFIG).train.micro_batch
    candidates = [m for m in (1, 2, 4, 8, 16, 32)
                  if all(p is not None and p.fits for p in (plan_for(m, 8), plan_for(m, 16)))]
    assert chosen == max(candidates), candidates
    plan = plan_for(chosen, 8)
    assert plan.gpu_total < 40 * GIB  # half an H100 at most: the planner's own peak
    # at most 2 micro-steps per step on 8 GPUs (each one all-gathers the model for forward and backward)
    assert load_config(CONFIG).train.accumulation_steps(8) <= 2
