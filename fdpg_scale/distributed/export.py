"""Latest checkpoint's policy → a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

The ZeRO-3 shards are consolidated into one fp32 state dict with DeepSpeed's ``zero_to_fp32``
(``get_fp32_state_dict_from_zero_checkpoint``: the fp32 master weights, whatever dtype trained), the
wrapper's ``hf_model.`` prefix is stripped, and the model is written with ``save_pretrained`` (which handles
tied weights such as GPT-2's wte/lm_head; safetensors' ``save_file`` refuses shared tensors). Config and
tokenizer come from the checkpoint's ``hf/`` folder. Runs in one process, no process group needed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fdpg_scale.distributed.checkpoint import find_latest, verify_checkpoint
from fdpg_scale.errors import CheckpointError

__all__ = ["export_checkpoint", "export_latest"]

_PREFIX = "hf_model."


def export_checkpoint(ckpt_dir: str | os.PathLike, to: str | os.PathLike, *,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write checkpoint ``ckpt_dir``'s policy to the HF directory ``to`` (created; must be empty if it exists)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt_dir, to = Path(ckpt_dir), Path(to)
    meta_dir = ckpt_dir / "hf"
    if not (meta_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a checkpoint written by fdpg_scale.distributed.checkpoint (no hf/config.json)")
    if to.exists() and any(to.iterdir()):
        raise FileExistsError(f"export destination {to} exists and is not empty")
    # The checksums the trainer checks before it resumes: a damaged checkpoint must not become a model that
    # loads and quietly differs from what was trained (export and eval only read; nothing is renamed here).
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise CheckpointError(f"{ckpt_dir} is damaged ({problem}): not exported; pass an earlier checkpoint of the "
                              f"run (its checkpoints/step_* directories)")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir / "policy"), tag="ds")
    bad = [k for k in state if not k.startswith(_PREFIX)]
    if bad:
        raise ValueError(f"{ckpt_dir}: unexpected parameter {bad[0]!r} (expected names under {_PREFIX!r})")
    state = {k[len(_PREFIX):]: v.to(dtype) for k, v in state.items()}

    config = AutoConfig.from_pretrained(meta_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied head (GPT-2's lm_head.weight IS wte.weight) may be stored once: missing is fine if tied to a loaded key.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(params[k]) for k in state if k in params}
    untied_missing = [k for k in missing if k not in params or id(params[k]) not in loaded_ids]
    if unexpected or untied_missing:
        raise ValueError(f"{ckpt_dir}: state dict does not fit {type(model).__name__}: missing {untied_missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    to.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(to, safe_serialization=True)
    AutoTokenizer.from_pretrained(meta_dir).save_pretrained(to)
    if (meta_dir / "generation_config.json").is_file():
        shutil.copy2(meta_dir / "generation_config.json", to / "generation_config.json")
    return to


def export_latest(output_dir: str | os.PathLike, to: str | os.PathLike) -> Path:
    """Export the latest checkpoint of run ``output_dir`` to ``to``; returns the checkpoint directory used."""
    ckpt = find_latest(output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{output_dir} has no checkpoint (looked in {Path(output_dir) / 'checkpoints'})")
    export_checkpoint(ckpt, to)
    return ckpt
