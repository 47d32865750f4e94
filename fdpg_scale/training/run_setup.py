"""What a run needs before its engines exist: the model directory and the DeepSpeed config dict.

Batch-size keys of the DeepSpeed JSON are derived from ``train.*`` (sequences per step, per micro-step,
accumulation) and the world size; a JSON that sets one of them to something else is an error, never a
silent override. The JSON holds explicit values only: DeepSpeed silently drops ``"auto"`` outside the HF
Trainer, so an ``"auto"`` anywhere is rejected by name (``distributed.engines.check_ds_config``, the same
checks the engines make).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fdpg_scale.distributed.engines import check_ds_config
from fdpg_scale.distributed.launch import barrier, is_rank0
from fdpg_scale.models.hub import local_dir
from fdpg_scale.training.config import ConfigError, ModelConfig, RunConfig

__all__ = ["prepare_model_dir", "deepspeed_config", "prepare_output_dir"]

_TINY_ARCH = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}


def prepare_model_dir(model: ModelConfig) -> Path:
    """The local HF directory the engines load; built first (rank 0, others wait) when ``model.build`` asks.
    A Hub id (``owner/name``) that is no local path is its snapshot in the local Hugging Face cache
    (``fdpg_scale.models.hub``; nothing is downloaded).

    Collective when the process group is up: every rank calls it.
    """
    path = Path(model.path)
    if model.build is not None:
        if is_rank0():
            from fdpg_scale.models.tiny import build_tiny_model_dir

            build_tiny_model_dir(path, arch=_TINY_ARCH[model.build], seed=model.build_seed)
        barrier()
    else:
        path = local_dir(model.path, where="model.path")
    if not path.is_dir():
        raise ConfigError(f"model.path {str(path)!r} is not a directory (a local Hugging Face model directory or a "
                          f"Hub id in the local cache is expected; set model.build to make a tiny one)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.path {str(path)!r} has no config.json: not a Hugging Face model directory")
    arch = json.loads(config_file.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in arch):
        raise ConfigError(f"model.path {str(path)!r} is not a causal LM (config.json architectures: {arch})")
    return path


def deepspeed_config(cfg: RunConfig, *, world_size: int, accumulation: int) -> dict:
    """The DeepSpeed config dict for this run: the JSON file plus the batch sizes derived from ``train.*``."""
    cfg.sampling_batch(world_size)  # the generation batch must split the rank's share: fail before any engine
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config {str(path)!r} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config {str(path)!r} is not valid JSON: {err}") from None
    ds = check_ds_config(ds, f"deepspeed.config {str(path)!r}")
    derived = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.config {str(path)!r} sets {key}={ds[key]!r} but the run config implies "
                              f"{value!r} (train.* with world size {world_size}): remove it from the JSON")
        ds[key] = value
    bf16 = cfg.model.dtype == "bf16"
    if ds.get("bf16", {}).get("enabled", bf16) != bf16:
        raise ConfigError(f"deepspeed.config {str(path)!r}: bf16.enabled={ds['bf16']['enabled']} contradicts "
                          f"model.dtype={cfg.model.dtype!r}")
    ds.setdefault("bf16", {})["enabled"] = bf16
    return ds


def prepare_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and check that this process can write into it (before any engine starts)."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {str(path)!r} is not writable ({err.strerror})") from None
    return path
