"""Typed run configuration: dataclasses with validation, loaded from YAML plus ``key=value`` overrides.

A config file is a YAML mapping whose sections mirror the dataclasses below (``model:``, ``divergence:``,
``target:``, ``train:``, ``sampling:``, ``deepspeed:``, ``logging:``) plus the top-level ``seed`` and
``output_dir``. Unknown keys and wrong types are rejected with the dotted key's name; nothing is ever
``eval``-ed. Overrides use the same dotted names: ``train.steps=20 divergence.name=js``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fdpg_scale.core.divergences import DIVERGENCE_NAMES, get_divergence
from fdpg_scale.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "load_config", "apply_overrides", "config_to_dict"]


@dataclass(kw_only=True)
class ModelConfig:
    path: str
    """Local Hugging Face directory the policy, the proposal and the base model all start from."""
    build: str | None = None
    """If set and ``path`` does not exist yet, build that model there first: ``tiny-gpt2`` or ``tiny-llama``
    (a few-hundred-kB model and tokenizer made on the spot, for smoke runs and tests)."""
    dtype: str = "fp32"
    """Parameter dtype of the engines: ``fp32`` or ``bf16`` (fp16 is not supported by DeepSpeed on CPU)."""

    def __post_init__(self):
        _choice("model.build", self.build, (None, "tiny-gpt2", "tiny-llama"))
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))


@dataclass(kw_only=True)
class DivergenceConfig:
    name: str = "js"
    """One of kl, rkl, tv, js, chi2, rchi2, hellinger, alpha."""
    alpha: float | None = None
    """α of the ``alpha`` divergence (α ∉ {0, 1}); must be unset for the others."""
    clip: float | None = None
    """Clamp pseudo-rewards to [−clip, clip] (off by default; when on, logged as a metric)."""

    def __post_init__(self):
        _choice("divergence.name", self.name, DIVERGENCE_NAMES)
        try:
            get_divergence(self.name, alpha=self.alpha)
        except ValueError as err:
            raise ConfigError(f"divergence.alpha: {err}") from None
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"divergence.clip must be > 0 when set, got {self.clip}")


@dataclass(kw_only=True)
class TargetConfig:
    kind: str = "pointwise"
    """``pointwise`` (P = a·b), ``distributional`` (P = a·exp(λ·φ), λ fitted) or ``reward`` (P = a·exp(r/β))."""
    scorer: str = "contains"
    """Name of a scorer in ``fdpg_scale.targets.tasks`` (e.g. ``contains``)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer, e.g. ``{substring: "def"}``."""
    moment: float | None = None
    """distributional: the target mean of the feature φ (E_p[φ] = moment)."""
    fit_samples: int = 256
    """distributional: sequences drawn (over all ranks) from the initial proposal to fit λ by SNIS."""
    prompts_file: str | None = None
    """Conditional target: a JSON Lines file of {"prompt": ...}; each sample continues a prompt drawn
    uniformly, with its own target P(x|c) and partition function Z(c). None: unconditional (from BOS)."""
    beta: float = 1.0
    """reward: temperature β of exp(r/β)."""

    def __post_init__(self):
        _choice("target.kind", self.kind, ("pointwise", "distributional", "reward"))
        if self.kind == "distributional" and self.moment is None:
            raise ConfigError("target.moment is required when target.kind is 'distributional'")
        if not self.beta > 0:
            raise ConfigError(f"target.beta must be > 0, got {self.beta}")
        if self.kind == "distributional" and self.prompts_file is not None:
            raise ConfigError("target.prompts_file (a conditional target) with target.kind 'distributional' is not "
                              "supported: λ is fitted for one unconditional target")
        if self.fit_samples < 1:
            raise ConfigError(f"target.fit_samples must be ≥ 1, got {self.fit_samples}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 10
    """Optimizer steps in total (a rerun with a larger value continues the same run)."""
    global_batch: int = 8
    """Sequences per optimizer step, whatever the world size."""
    micro_batch: int = 4
    """Sequences per rank per forward/backward; accumulation = global_batch / (micro_batch · world)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (after the warm-up)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""
    baseline: bool = True
    """Subtract a moving average of earlier pseudo-rewards (inside the importance ratio: stays unbiased)."""
    baseline_momentum: float = 0.9
    on_policy: bool = False
    """Sample from π itself (no separate proposal engine)."""
    proposal_update_interval: int = 1
    """Every this many steps, replace q by π if π is closer to p (off-policy only)."""
    proposal_update_metric: str = "kl"
    """Importance-sampled divergence deciding "closer": ``kl`` (KL(p‖·)) or ``tv``."""
    save_every: int = 5
    """Checkpoint every this many steps (and at the end, and on SIGUSR1/SIGTERM)."""
    keep_checkpoints: int = 2

    def __post_init__(self):
        for key in ("steps", "global_batch", "micro_batch", "save_every", "keep_checkpoints",
                    "proposal_update_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ConfigError(f"train.baseline_momentum must be in [0, 1), got {self.baseline_momentum}")
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("train.proposal_update_metric", self.proposal_update_metric, ("kl", "tv"))

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; raises if the global batch does not split evenly."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch × world size "
                f"= {self.micro_batch} × {world_size} = {per_step}")
        return self.global_batch // per_step


@dataclass(kw_only=True)
class VllmConfig:
    """The vLLM proposal engine (``sampling.engine: vllm``): one engine per rank, colocated with training."""
    kv_cache_mib: int | None = 512
    """KV-cache size of each engine in MiB (needed on CPU: vLLM would otherwise ask for 90% of RAM); null on
    a GPU to size the cache from ``gpu_memory_utilization`` instead."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the rank's GPU the engine may take (weights + KV cache) beside the ZeRO-3 engines, when
    ``kv_cache_mib`` is null. Ignored on CPU."""
    max_model_len: int | None = None
    """Longest prompt + continuation the engine serves; null: the model's context length."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile in the engine: starts fast (CPU); set false on GPUs for speed."""

    def __post_init__(self):
        if self.kv_cache_mib is not None and self.kv_cache_mib < 1:
            raise ConfigError(f"sampling.vllm.kv_cache_mib must be ≥ 1 or null, got {self.kv_cache_mib}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"sampling.vllm.gpu_memory_utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"sampling.vllm.max_model_len must be ≥ 2 or null, got {self.max_model_len}")


@dataclass(kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    """0 disables top-k truncation."""
    top_p: float = 1.0
    """1.0 disables nucleus truncation."""
    generation_mode: str = "gathered"
    """``gathered``: gather the whole model once per rollout (fits one device); ``sharded``: keep ZeRO-3
    shards and generate with ``synced_gpus``. Applies to ``engine: hf``."""
    engine: str = "hf"
    """What samples q: ``hf`` (transformers generate on the ZeRO-3 proposal, as ``generation_mode`` says) or
    ``vllm`` (a vLLM engine per rank holding a copy of q, refreshed when q changes; needs the ``vllm`` extra)."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Settings of the vLLM engine (used when ``engine`` is ``vllm``)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _choice("sampling.generation_mode", self.generation_mode, ("gathered", "sharded"))
        _choice("sampling.engine", self.engine, ("hf", "vllm"))


@dataclass(kw_only=True)
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3_cpu.json"
    """DeepSpeed JSON (explicit values only). Batch sizes are filled in from ``train.*``; a JSON that sets
    them differently is an error."""


@dataclass(kw_only=True)
class LoggingConfig:
    summary_every: int = 1
    """Print a one-line summary every this many steps (rank 0)."""
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        if self.summary_every < 1:
            raise ConfigError(f"logging.summary_every must be ≥ 1, got {self.summary_every}")


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    """Where metrics.jsonl, TensorBoard events and checkpoints go; a rerun with the same directory resumes."""


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file, apply ``key=value`` overrides, validate, and return a ``RunConfig``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {err})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    return _build(RunConfig, raw, prefix="")


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of the raw mapping with each ``dotted.key=value`` set (value parsed as YAML scalar)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        _check_path(RunConfig, parts, key)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = text
    return raw


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as a plain mapping (what ``load_config`` reads back to an equal config)."""
    return dataclasses.asdict(cfg)


def _check_path(cls: type, parts: list[str], key: str) -> None:
    """Reject an override whose dotted key names no field (before anything is built)."""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} "
                              f"(valid: {', '.join(sorted(fields))})")
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            cls = hint
        elif i < len(parts) - 1:
            if _origin(hint) is dict:
                return  # free-form mapping (e.g. target.scorer_args.substring)
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (valid in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    raw_value = {}
                else:
                    raise ConfigError(f"missing required config key {key!r}")
            else:
                continue
        else:
            raw_value = raw[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, {} if raw_value is None else raw_value, key + ".")
        else:
            kwargs[name] = _coerce(raw_value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _origin(hint):
    return typing.get_origin(hint)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key {key!r}: {value!r} matches none of {hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"config key {key!r} must be a number, got nan")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a bug in this file
        raise TypeError(f"config key {key!r}: unsupported annotation {hint!r}")
    raise ConfigError(f"config key {key!r} must be of type {hint.__name__}, got {value!r} "
                      f"({type(value).__name__})")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, options))}; got {value!r}")


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}
