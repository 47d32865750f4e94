"""Latest checkpoint's policy → a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

The ZeRO-3 shards are consolidated into one fp32 state dict with DeepSpeed's ``zero_to_fp32``
(``get_fp32_state_dict_from_zero_checkpoint``: the fp32 master weights, whatever dtype trained), the
wrapper's ``hf_model.`` prefix is stripped, and the model is written with ``save_pretrained`` (which handles
tied weights such as GPT-2's wte/lm_head; safetensors' ``save_file`` refuses shared tensors). Config and
tokenizer come from the checkpoint's ``hf/`` folder. Runs in one process, no process group needed.

A LoRA run (``model.lora``) saves the policy adapter only: export loads the base model it names
(``lora/adapter_config.json``), writes the adapter as a PEFT directory ``<to>/adapter`` (``PeftModel.from_pretrained``
loads it on that base) and the base with the adapter merged in as ``<to>`` itself (``from_pretrained``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fdpg_scale.distributed.checkpoint import find_latest, verify_checkpoint
from fdpg_scale.errors import CheckpointError

__all__ = ["export_checkpoint", "export_latest", "ADAPTER_DIR"]

_PREFIX = "hf_model."
#: Where a LoRA run's adapter goes inside the export directory (the merged model is the directory itself).
ADAPTER_DIR = "adapter"


def export_checkpoint(ckpt_dir: str | os.PathLike, to: str | os.PathLike, *,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write checkpoint ``ckpt_dir``'s policy to the HF directory ``to`` (created; must be empty if it exists)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

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
    if (ckpt_dir / "lora" / "adapter_config.json").is_file():
        model = _merged_lora_model(ckpt_dir, state, to, dtype=dtype)
        _write_model(model, meta_dir, to)
        return to

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
    _write_model(model, meta_dir, to)
    return to


def _write_model(model, meta_dir: Path, to: Path) -> None:
    from transformers import AutoTokenizer

    to.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(to, safe_serialization=True)
    AutoTokenizer.from_pretrained(meta_dir).save_pretrained(to)
    if (meta_dir / "generation_config.json").is_file():
        shutil.copy2(meta_dir / "generation_config.json", to / "generation_config.json")


def _merged_lora_model(ckpt_dir: Path, state: dict[str, torch.Tensor], to: Path, *, dtype: torch.dtype):
    """A LoRA checkpoint's policy: its adapter written as a PEFT directory ``to/ADAPTER_DIR`` (loads with
    ``PeftModel.from_pretrained(base, to/ADAPTER_DIR)``), and -> the base model with the adapter merged in."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from fdpg_scale.distributed.adapters import POLICY, peft_key

    config = LoraConfig.from_pretrained(str(ckpt_dir / "lora"))
    base = Path(config.base_model_name_or_path or "")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: the LoRA run's base model {str(base)!r} (lora/adapter_config.json) is "
                                f"not a model directory any more; the adapter needs its base to be exported")
    adapter = {peft_key(k, POLICY): v for k, v in state.items() if f".{POLICY}." in k}
    frozen = [k for k in state if f".{POLICY}." not in k]
    if not adapter or frozen:
        raise ValueError(f"{ckpt_dir}: a LoRA checkpoint holds the policy adapter only; found {len(adapter)} adapter "
                         f"tensors and {frozen[:3]} besides")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), config)
    result = set_peft_model_state_dict(model, adapter)
    if result.unexpected_keys:
        raise ValueError(f"{ckpt_dir}: adapter tensors the base model has no place for: {result.unexpected_keys[:3]}")
    model.save_pretrained(str(to / ADAPTER_DIR))
    return model.merge_and_unload()


def export_latest(output_dir: str | os.PathLike, to: str | os.PathLike) -> Path:
    """Export the latest checkpoint of run ``output_dir`` to ``to``; returns the checkpoint directory used."""
    ckpt = find_latest(output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{output_dir} has no checkpoint (looked in {Path(output_dir) / 'checkpoints'})")
    export_checkpoint(ckpt, to)
    return ckpt
