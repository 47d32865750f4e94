"""Checks of a run's inputs before any engine starts: each bad input is one ConfigError naming the key or file.

What the config dataclasses cannot see alone, because it needs the world size or the files on disk:

- the global batch splits over the world size (``train.global_batch``), and ``sampling.batch`` divides each
  rank's share; so do ``eval.samples`` when ``eval.every`` is on;
- ``model.path`` (built first when ``model.build`` asks) is a causal LM directory *with weights*;
- its tokenizer files exist (transformers otherwise builds an empty tokenizer silently), its BOS, EOS and pad
  tokens give a start token and a padding token (BOS else EOS, pad else EOS: ``models/tokens.py``), and it has
  no more tokens than the model's embedding;
- the longest prompt plus ``sampling.max_new_tokens`` fits the model's positions;
- the DeepSpeed JSON and the prompts (``target.prompts`` or ``target.prompts_file``: columns, rows, chat
  template) are valid, and the target's scorers take their arguments and the prompts' metadata columns;
- ``output_dir`` is writable;
- every tracker of ``logging.trackers`` is installed (its extra: ``training/trackers.py``).

``slurm/train.sbatch`` runs the same checks in one process before it starts any rank, so a bad input is
one line in the job log rather than one per rank under a launcher's traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from fdpg_scale.models.tokens import special_token_problem
from fdpg_scale.errors import ConfigError
from fdpg_scale.training.config import RunConfig
from fdpg_scale.training.run_setup import deepspeed_config, prepare_model_dir, prepare_output_dir
from fdpg_scale.training.trackers import check_installed

__all__ = ["preflight", "check_model_files"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# A fast tokenizer's tokenizer.json, or the vocabulary files a slow tokenizer is built from.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def check_model_files(model_dir: Path) -> dict:
    """Weights and tokenizer files present in ``model_dir`` (sharded weights: every shard); returns config.json."""
    where = f"model.path {str(model_dir)!r}"
    config = json.loads((model_dir / "config.json").read_text())
    if not any((model_dir / name).is_file() for name in _WEIGHTS):
        index = next((model_dir / n for n in _WEIGHT_INDEXES if (model_dir / n).is_file()), None)
        if index is None:
            raise ConfigError(f"{where} has config.json but no weights (expected {' or '.join(_WEIGHTS)}, or a "
                              f"sharded {' / '.join(_WEIGHT_INDEXES)})")
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ConfigError(f"{where}: {index.name} is not a valid weight index (no weight_map)") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ConfigError(f"{where}: {len(missing)} of the {len(shards)} weight shards named in {index.name} "
                              f"are missing (first: {missing[0]})")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"{where} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
                          f"transformers would build an empty tokenizer")
    return config


def _check_tokenizer(tokenizer, config: dict, model_dir: Path) -> None:
    where = f"model.path {str(model_dir)!r}"
    if len(tokenizer) == 0:
        raise ConfigError(f"{where}: the tokenizer has no tokens")
    problem = special_token_problem(tokenizer)   # BOS, EOS and pad together: each missing one falls back to EOS
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                          f"vocab_size={vocab} rows (config.json): they do not belong together")


def _check_positions(cfg: RunConfig, config: dict, prompt_len: int, model_dir: Path) -> None:
    limit = next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)
    need = prompt_len + cfg.sampling.max_new_tokens
    if limit is not None and need > limit:
        what = "the longest prompt" if cfg.target.conditional else "the start token"
        raise ConfigError(f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} plus {what} ({prompt_len} "
                          f"tokens) is {need}, more than the {limit} positions of model.path {str(model_dir)!r}")


def preflight(cfg: RunConfig, *, world_size: int) -> Path:
    """Run every check above; returns the model directory (built first if ``model.build`` asks).

    Collective when a process group is up (the model build: rank 0 builds, the others wait). Raises
    ConfigError with one line naming the key or file.
    """
    from transformers import AutoTokenizer

    from fdpg_scale.targets.tasks import build_task
    from fdpg_scale.training.prompts import load_target_prompts

    accumulation = cfg.train.accumulation_steps(world_size)
    deepspeed_config(cfg, world_size=world_size, accumulation=accumulation)
    if cfg.eval.every:
        from fdpg_scale.training.in_run_eval import eval_accumulation

        eval_accumulation(cfg.eval.samples, micro_batch=cfg.train.micro_batch, world=world_size)
    check_installed(cfg.logging.active_trackers)
    prepare_output_dir(cfg.output_dir)
    model_dir = prepare_model_dir(cfg.model)
    config = check_model_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path {str(model_dir)!r}: the tokenizer does not load "
                          f"({' '.join(str(err).split())[:300]})") from None
    _check_tokenizer(tokenizer, config, model_dir)
    prompts = load_target_prompts(cfg.target, tokenizer)
    build_task(cfg.target, tokenizer, dtype=cfg.model.dtype,
               metadata_columns=() if prompts is None else tuple(prompts.metadata))
    prompt_len = 1 if prompts is None else max(len(ids) for ids in prompts.token_ids)
    _check_positions(cfg, config, prompt_len, model_dir)
    if cfg.model.lora is not None:
        _check_lora_targets(cfg, model_dir)
    return model_dir


def _check_lora_targets(cfg: RunConfig, model_dir: Path) -> None:
    """model.lora.target_modules against the model's modules, on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fdpg_scale.distributed.adapters import check_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    check_target_modules(model, cfg.model.lora)
