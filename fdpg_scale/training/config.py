"""Typed run configuration (the schema): dataclasses with validation, loaded from YAML plus ``key=value``
overrides by the generic loader (``training.config_loader``).

A config file is a YAML mapping whose sections mirror the dataclasses below (``model:``, ``divergence:``,
``target:``, ``train:``, ``sampling:``, ``deepspeed:``, ``distributed:``, ``logging:``, ``eval:``) plus the
top-level ``seed`` and ``output_dir``. Unknown keys and wrong types are rejected with the dotted key's name; nothing is ever
``eval``-ed. Overrides use the same dotted names: ``train.steps=20 divergence.name=js``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdpg_scale.distributed.settings import LoraSettings, SamplingSettings, VllmEngineOptions
from fdpg_scale.errors import ConfigError
from fdpg_scale.training import config_loader
from fdpg_scale.training.config_loader import build_section, load_dataclass, read_yaml, to_plain

__all__ = ["ConfigError", "RunConfig", "ScorerConfig", "TargetConfig", "load_config", "apply_overrides",
           "config_to_dict", "build_section", "read_yaml"]


@dataclass(frozen=True, kw_only=True)
class LoraConfig(LoraSettings):
    """``model.lora``: train LoRA adapters on one frozen base shared by π, q and a (docs/method.md, "LoRA");
    the fields are ``distributed.settings.LoraSettings``'. Which modules exist is checked against the model
    at start-up (``distributed.adapters.check_target_modules``)."""

    def __post_init__(self):
        _checked("model.lora", super().__post_init__)


@dataclass(kw_only=True)
class ModelConfig:
    path: str
    """Local Hugging Face directory the policy, the proposal and the base model all start from."""
    build: str | None = None
    """If set and ``path`` does not exist yet, build that model there first: ``tiny-gpt2`` or ``tiny-llama``
    (a few-hundred-kB model and tokenizer made on the spot, for smoke runs and tests)."""
    build_seed: int = 0
    """Initialisation seed of the model ``build`` makes: its own seed, not the run's ``seed``, so that runs
    with different seeds share one built model."""
    dtype: str = "fp32"
    """Parameter dtype of the engines: ``fp32`` or ``bf16`` (fp16 is not supported by DeepSpeed on CPU)."""
    lora: LoraConfig | None = None
    """null: full fine-tuning (π, q and a are three ZeRO-3 models). Set (e.g. ``model.lora.r=8``): one frozen base
    with a trainable "policy" and a frozen "proposal" adapter; a is the base with adapters off."""

    def __post_init__(self):
        _choice("model.build", self.build, (None, "tiny-gpt2", "tiny-llama"))
        _seed("model.build_seed", self.build_seed)
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))


@dataclass(kw_only=True)
class DivergenceConfig:
    name: str = "js"
    """One of kl, rkl, tv, js, chi2, rchi2, hellinger, alpha."""
    alpha: float | None = None
    """α of the ``alpha`` divergence (α ∉ {0, 1}); must be unset for the others."""
    clip: float | None = None
    """Clamp pseudo-rewards to [−clip, clip] (off by default; when on, logged as a metric)."""
    outside_support_reward: float | None = None
    """The pseudo-reward r of a sample outside the target's support (P(x) = 0: a pointwise constraint with
    b(x) = 0) for the divergences whose f′ → +∞ there: rkl, rchi2 and alpha with α > 1. Their D_f(π‖p) is
    infinite as soon as π puts mass where p has none, so no finite r is exact: this is a chosen penalty
    (e.g. -20; the sample's weight is ρ·(B − r)). null: not chosen, and a pointwise target with one of these
    divergences stops at start-up. kl, tv, js, chi2, hellinger and alpha with α < 1 have a finite f′ there
    and always use its exact limit; they do not read this key."""

    def __post_init__(self):
        # Imported here, not at the top: the divergences need torch, and the CLI reads configs (plan, --help
        # of every command) without loading it.
        from fdpg_scale.core.divergences import DIVERGENCE_NAMES, get_divergence

        _choice("divergence.name", self.name, DIVERGENCE_NAMES)
        try:
            get_divergence(self.name, alpha=self.alpha)
        except ValueError as err:
            raise ConfigError(f"divergence.alpha: {err}") from None
        if self.clip is not None and not 0 < self.clip < math.inf:
            raise ConfigError(f"divergence.clip must be a finite number > 0 when set, got {self.clip}")
        if self.outside_support_reward is not None and not math.isfinite(self.outside_support_reward):
            raise ConfigError(f"divergence.outside_support_reward must be a finite float or null, "
                              f"got {self.outside_support_reward}")

    def unbounded_outside_support(self) -> bool:
        """True when f′ → +∞ at P = 0 (rkl, rchi2, alpha with α > 1): such samples need
        ``outside_support_reward``."""
        from fdpg_scale.core.divergences import get_divergence   # torch: only once a config is checked

        return get_divergence(self.name, alpha=self.alpha).fprime_spec.limit_at_infinity is None


_SCORER_KINDS = ("pointwise", "reward", "feature")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(kw_only=True)
class ScorerConfig:
    """One entry of ``target.scorers``: a scorer and how it enters the target
    P = a · Π b_i · exp(Σ r_j/β_j + Σ λ_k φ_k)."""

    scorer: str
    """A built-in scorer (``contains``, ``count``, ``parses_as_python``), ``hf-classifier`` (a Hugging Face sequence
    classifier of the completion; its path and label go in ``scorer_args``), ``hf-reward-model`` (a Hugging Face
    reward model of prompt + completion; its path in ``scorer_args``) or ``package.module:function``. The two
    model scorers read a local directory or a Hub id in the local cache, run in the run's ``model.dtype`` unless
    ``scorer_args.dtype`` says otherwise, and appear in ``fdpg-scale plan``."""
    kind: str = "pointwise"
    """``pointwise`` (a constraint b(x) = [score > 0]), ``reward`` (a reward r(x), factor exp(r/β)) or ``feature``
    (a feature φ(x), factor exp(λφ) with λ fitted jointly so that E_p[φ] = ``moment``)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer, checked against its signature."""
    name: str | None = None
    """Its column in metrics.jsonl and eval.json (``alignment/<name>``); default: the built-in's name, the
    function's name, or ``hf-classifier``. Two entries with the same name are an error: name them."""
    beta: float = 1.0
    """reward: temperature β of exp(r/β)."""
    moment: float | None = None
    """feature: the target mean E_p[φ] (required for a feature)."""

    def __post_init__(self):
        _choice("target.scorers[].kind", self.kind, _SCORER_KINDS)
        where = f"target.scorers entry {self.scorer!r}"
        if self.kind == "feature" and self.moment is None:
            raise ConfigError(f"{where}: moment is required when kind is 'feature'")
        if self.kind != "feature" and self.moment is not None:
            raise ConfigError(f"{where}: moment is only for kind 'feature', not {self.kind!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"{where}: beta must be a finite number > 0, got {self.beta}")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ConfigError(f"{where}: name {self.name!r} must be letters, digits, '_', '.' or '-'")


@dataclass(kw_only=True)
class TargetConfig:
    kind: str = "pointwise"
    """``pointwise`` (P = a·b), ``distributional`` (P = a·exp(λ·φ), λ fitted) or ``reward`` (P = a·exp(r/β))."""
    scorer: str = "contains"
    """A built-in scorer (``contains``, ``count``, ``parses_as_python``), ``hf-classifier`` (a Hugging Face sequence
    classifier of the completion), ``hf-reward-model`` (a Hugging Face reward model of prompt + completion: r = its
    logit) or ``package.module:function`` (your own function of the decoded texts). The model scorers run in the
    run's ``model.dtype`` unless ``scorer_args.dtype`` says otherwise, and appear in ``fdpg-scale plan``."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer, e.g. ``{substring: "def"}``; checked against its signature."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """Several scorers in one target (each with its kind, args, β or moment), instead of ``kind``/``scorer``/
    ``scorer_args``/``moment``/``beta``: P = a · Π b_i · exp(Σ r_j/β_j + Σ λ_k φ_k), λ fitted jointly."""
    moment: float | None = None
    """distributional: the target mean of the feature φ (E_p[φ] = moment)."""
    fit_samples: int = 256
    """distributional: sequences drawn (over all ranks) from the initial proposal to fit λ by SNIS."""
    prompts_file: str | None = None
    """Conditional target: a JSON Lines file of {"prompt": ...}; each sample continues a prompt drawn
    uniformly, with its own target P(x|c) and partition function Z(c). None: unconditional (from BOS, else EOS).
    The older form of ``prompts`` (a JSONL file, column ``prompt``); set one of the two."""
    prompts: str | None = None
    """Conditional target, read with the ``datasets`` library: a .json/.jsonl/.csv/.parquet file, a directory
    saved by ``Dataset.save_to_disk`` or of such files, or a Hub dataset id (``owner/name``) read from the local
    Hugging Face cache (nothing is downloaded). Each row is one context c with its own P(x|c) and Z(c)."""
    split: str = "train"
    """The split of ``prompts`` to read (a single file is the split ``train``)."""
    prompt_column: str = "prompt"
    """The column of ``prompts`` holding each prompt: a string, or a list of {role, content} messages."""
    metadata_columns: list[str] | None = None
    """The other columns of ``prompts`` that ``package.module:function`` scorers receive as keyword arguments
    (one list of B values per column, row i for the prompt sample i continues). null: every column but
    ``prompt_column``; []: none."""
    chat_template: bool | None = None
    """Render prompts with the tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=
    True)``): null uses it when the tokenizer has one, true requires one, false never uses it."""
    beta: float = 1.0
    """reward: temperature β of exp(r/β)."""

    def __post_init__(self):
        _choice("target.kind", self.kind, ("pointwise", "distributional", "reward"))
        if self.kind == "distributional" and self.moment is None:
            raise ConfigError("target.moment is required when target.kind is 'distributional'")
        if not 0 < self.beta < math.inf:
            raise ConfigError(f"target.beta must be a finite number > 0, got {self.beta}")
        if self.moment is not None and not math.isfinite(self.moment):
            raise ConfigError(f"target.moment must be a finite number, got {self.moment}")
        if self.prompts is not None and self.prompts_file is not None:
            raise ConfigError("target.prompts and target.prompts_file are both set: set one (prompts_file is the older "
                              "form of prompts)")
        if self.prompts is not None and not self.prompts.strip():
            raise ConfigError("target.prompts must not be empty (null: an unconditional target)")
        for key in ("split", "prompt_column"):
            if not getattr(self, key).strip():
                raise ConfigError(f"target.{key} must not be empty")
        if self.metadata_columns is not None and self.prompt_column in self.metadata_columns:
            raise ConfigError(f"target.metadata_columns lists target.prompt_column {self.prompt_column!r}: the "
                              f"prompt reaches scorers as contexts")
        if self.kind == "distributional" and self.conditional:
            raise ConfigError(f"target.{self.prompts_key} (a conditional target) with target.kind 'distributional' "
                              f"is not supported: λ is fitted for one unconditional target")
        if self.fit_samples < 1:
            raise ConfigError(f"target.fit_samples must be ≥ 1, got {self.fit_samples}")
        if self.scorers:
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
            clash = [k for k in ("kind", "scorer", "moment", "beta") if getattr(self, k) != defaults[k]]
            clash += ["scorer_args"] if self.scorer_args else []
            if clash:
                raise ConfigError(f"target.scorers replaces target.{', target.'.join(clash)}: set "
                                  f"{'/'.join(clash)} inside each entry of target.scorers instead")
            self.scorers = [s if isinstance(s, ScorerConfig) else ScorerConfig(**s) for s in self.scorers]
        fitted = any(s.kind == "feature" for s in self.scorers) or self.kind == "distributional"
        if fitted and self.conditional:
            raise ConfigError(f"target.{self.prompts_key} (a conditional target) with a distributional target (a "
                              f"feature whose λ is fitted) is not supported: λ is fitted for one unconditional target")

    @property
    def conditional(self) -> bool:
        """Whether the target has contexts (``prompts`` or ``prompts_file`` set)."""
        return self.prompts is not None or self.prompts_file is not None

    @property
    def prompts_key(self) -> str:
        """The key that names the prompts, for errors: ``prompts`` or ``prompts_file``."""
        return "prompts_file" if self.prompts_file is not None else "prompts"


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
    """Check every this many steps whether to replace q by π (off-policy only); a check decides only once
    ``proposal_min_samples`` samples have accumulated since the last decision."""
    proposal_update_metric: str = "kl"
    """Importance-sampled divergence deciding "closer": ``kl`` (KL(p‖·)) or ``tv``."""
    proposal_min_samples: int = 256
    """Samples (all ranks, accumulated over steps) a replacement decision is made on; one batch of 32 decided
    wrongly a quarter of the time on the enumerable toy."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them (less
    memory, about one more forward of compute). Dropout is set to 0 in the model's config so that the
    recomputed forward is the same deterministic function as the first."""
    inference_copies: bool = False
    """Keep a whole, hook-free copy of each frozen model (the base a; the proposal q, refreshed when q ← π) on
    every rank, and sample and score through it instead of through its ZeRO-3 engine (no gather per rollout,
    no per-module hooks per forward): the same values, faster for small models, at the memory of one whole
    model per copy and rank (``distributed/inference_copy.py``)."""
    save_every: int = 5
    """Checkpoint every this many steps (and at the end, and on SIGUSR1/SIGTERM)."""
    keep_checkpoints: int = 2
    on_nonfinite: str = "skip"
    """What a step whose loss or gradients are not finite (NaN/inf) does, decided on all ranks together before
    the optimizer step: ``skip`` (the update is dropped, counted in the ``nonfinite_skips`` metric and logged)
    or ``stop`` (the run ends with one line). Weights that an update made non-finite always stop the run
    before anything is saved: that update cannot be undone."""
    max_consecutive_skips: int = 5
    """With ``on_nonfinite: skip``, stop (one line) after this many non-finite steps in a row: a run that skips
    every step learns nothing."""

    def __post_init__(self):
        for key in ("steps", "global_batch", "micro_batch", "save_every", "keep_checkpoints",
                    "proposal_update_interval", "proposal_min_samples", "max_consecutive_skips"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"train.weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if not 0 <= self.grad_clip < math.inf:
            raise ConfigError(f"train.grad_clip must be a finite number ≥ 0 (0 disables), got {self.grad_clip}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ConfigError(f"train.baseline_momentum must be in [0, 1), got {self.baseline_momentum}")
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be < train.steps={self.steps} with "
                              f"train.lr_schedule 'cosine' (the cosine runs over the steps after the warm-up)")
        _choice("train.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _choice("train.proposal_update_metric", self.proposal_update_metric, ("kl", "tv"))

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; raises if the global batch does not split evenly."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch × world size "
                f"= {self.micro_batch} × {world_size} = {per_step}")
        return self.global_batch // per_step


def _checked(section: str, check) -> None:
    """Run a settings class's own checks, naming the key in the config (``sampling.top_p must be ...``)."""
    try:
        check()
    except ValueError as err:
        raise ConfigError(f"{section}.{err}") from None


@dataclass(frozen=True, kw_only=True)
class VllmConfig(VllmEngineOptions):
    """The vLLM proposal engine (``sampling.engine: vllm``): one engine per rank, colocated with training.
    Its options beyond the KV cache (``gpu_memory_utilization``, ``max_model_len``, ``enforce_eager``) are
    the engine's own (``distributed.settings.VllmEngineOptions``); ``max_model_len`` null here means the
    longest prompt + ``sampling.max_new_tokens``."""
    kv_cache_mib: int | None = None
    """KV-cache size of each engine in MiB; null: 512 MiB on CPU (vLLM would otherwise ask for 90% of RAM),
    and on a GPU sized from the memory left when the engine starts (``gpu_memory_utilization``)."""

    def __post_init__(self):
        _checked("sampling.vllm", super().__post_init__)
        if self.kv_cache_mib is not None and self.kv_cache_mib < 1:
            raise ConfigError(f"sampling.vllm.kv_cache_mib must be ≥ 1 or null, got {self.kv_cache_mib}")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig(SamplingSettings):
    """How a rollout samples. The fields that define q itself (``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``) are the sampler's own (``distributed.settings.SamplingSettings``; ``sampling_settings()``
    returns them alone)."""
    generation_mode: str = "gathered"
    """``gathered``: gather the whole model once per rollout (fits one device); ``sharded``: keep ZeRO-3
    shards and generate with ``synced_gpus``. Applies to ``engine: hf``."""
    batch: int | None = None
    """Sequences per ``generate`` call (None: ``train.micro_batch``). A rank samples its whole share of a step
    (global_batch / world sequences) in one rollout of share/batch calls, then scores and trains in
    micro-batches. Must be a multiple of ``train.micro_batch`` dividing the share. The per-chunk seeds are
    tied to this size, not to the world size: 1 and N ranks draw the same batch for the same value."""
    rescore_logq: bool = True
    """Rescore log q of the sampled tokens with the proposal's fused forward (the function log π comes from)
    instead of using what ``generate`` recorded; exact for temperature-only sampling. With top_k/top_p the
    recorded (truncated, renormalised) log q is kept, and the run log says so. With fp32 weights on the CPU the
    recorded value already is the fused forward's (within 1e-5), so no rescoring forward runs there."""
    engine: str = "hf"
    """What samples q: ``hf`` (transformers generate on the ZeRO-3 proposal, as ``generation_mode`` says) or
    ``vllm`` (a vLLM engine per rank holding a copy of q, refreshed when q changes; needs the ``vllm`` extra)."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Settings of the vLLM engine (used when ``engine`` is ``vllm``)."""

    def __post_init__(self):
        _checked("sampling", super().__post_init__)
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"sampling.batch must be ≥ 1 when set, got {self.batch}")
        _choice("sampling.generation_mode", self.generation_mode, ("gathered", "sharded"))
        _choice("sampling.engine", self.engine, ("hf", "vllm"))


@dataclass(kw_only=True)
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3_cpu.json"
    """DeepSpeed JSON (explicit values only). Batch sizes are filled in from ``train.*``; a JSON that sets
    them differently is an error."""


_TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio")   # training/trackers.py's adapters


@dataclass(kw_only=True)
class DistributedConfig:
    """The process group (``distributed/launch.py``)."""
    timeout_s: float = 600.0
    """Seconds a collective (and the rendezvous) may wait for the other ranks before it fails. A rank that
    stops answering (a hung GPU, a stopped process, a dead node whose sockets stay open) then ends the run with
    one line naming the step and phase, non-zero, so that the scheduler can requeue it, instead of holding the
    nodes until the wall-clock limit. Long enough for the slowest legitimate wait: a checkpoint save or a
    resume's verification on the other ranks, the first build of DeepSpeed's C++ op (35-47 s on a CPU)."""

    def __post_init__(self):
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"distributed.timeout_s must be a finite number of seconds > 0, got {self.timeout_s}")


@dataclass(kw_only=True)
class LoggingConfig:
    summary_every: int = 1
    """Print a one-line summary every this many steps (rank 0)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where each step's metrics (and the samples table) go besides metrics.jsonl: any of tensorboard, wandb,
    mlflow, trackio (training/trackers.py), all writing locally under output_dir or on this machine. wandb, mlflow
    and trackio are optional extras (``pip install 'fdpg-scale[wandb]'``); one that is not installed stops the run
    before it starts."""
    tensorboard: bool = True
    """false: no TensorBoard events even when ``trackers`` lists tensorboard (the older switch)."""
    project: str = "fdpg-scale"
    """The W&B / trackio project and the MLflow experiment the run is logged under."""
    run_name: str | None = None
    """The tracker run's name; null: output_dir's last component."""
    wandb_mode: str = "offline"
    """``offline`` (W&B writes under output_dir/wandb, nothing leaves the machine; ``wandb sync`` uploads it
    later) or ``online``."""
    mlflow_tracking_uri: str | None = None
    """MLflow's tracking URI; null: a SQLite store output_dir/mlflow.db (artifacts in output_dir/mlartifacts)."""
    samples_every: int = 0
    """Every this many optimizer steps, rank 0's sampled completions with their log-probabilities, weights and
    scores go to output_dir/samples.jsonl and to the trackers (training/samples_table.py); 0: never."""
    progress_bar: bool = True

    def __post_init__(self):
        if self.summary_every < 1:
            raise ConfigError(f"logging.summary_every must be ≥ 1, got {self.summary_every}")
        for name in self.trackers:
            _choice("logging.trackers[]", name, _TRACKER_NAMES)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"logging.trackers names a tracker twice: {self.trackers}")
        _choice("logging.wandb_mode", self.wandb_mode, ("offline", "online"))
        if not self.project.strip():
            raise ConfigError("logging.project must not be empty")
        if self.samples_every < 0:
            raise ConfigError(f"logging.samples_every must be ≥ 0 (0: off), got {self.samples_every}")

    @property
    def active_trackers(self) -> list[str]:
        """``trackers`` without tensorboard when ``tensorboard`` is false."""
        return [t for t in self.trackers if self.tensorboard or t != "tensorboard"]


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation during training (training/in_run_eval.py): fresh samples from π, logged as ``eval/*``."""
    every: int = 0
    """Evaluate after every this many optimizer steps (and after the last); 0: never during training."""
    samples: int = 64
    """Sequences drawn from π per evaluation, over all ranks: a multiple of train.micro_batch × world size."""

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"eval.every must be ≥ 0 (0: off), got {self.every}")
        if self.samples < 1:
            raise ConfigError(f"eval.samples must be ≥ 1, got {self.samples}")


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    """Where metrics.jsonl, TensorBoard events and checkpoints go; a rerun with the same directory resumes."""

    def __post_init__(self):
        if (self.target.kind == "pointwise" and self.divergence.outside_support_reward is None
                and self.divergence.unbounded_outside_support()):
            raise ConfigError(f"divergence.outside_support_reward is required with divergence "
                              f"{self.divergence.name!r} and a pointwise target: its f′ is +∞ on samples with "
                              f"b(x) = 0, so their pseudo-reward is a penalty you choose (e.g. "
                              f"divergence.outside_support_reward=-20)")
        if self.sampling.batch is not None and self.sampling.batch % self.train.micro_batch:
            raise ConfigError(f"sampling.batch={self.sampling.batch} must be a multiple of "
                              f"train.micro_batch={self.train.micro_batch}")
        if self.train.inference_copies and self.model.lora is not None:
            # LoRA shares one base among π, q and a to hold one model; whole copies of a and q would hold three.
            raise ConfigError("train.inference_copies keeps whole copies of a and q, which model.lora's one shared "
                              "base is there to avoid: set train.inference_copies=false with model.lora")
        _seed("seed", self.seed)
        if not self.output_dir.strip():
            raise ConfigError("output_dir must not be empty")

    def sampling_batch(self, world_size: int) -> int:
        """Sequences per generate call on ``world_size`` ranks; raises ConfigError if it does not divide the
        rank's share of the global batch (checked with the world size, before any engine starts)."""
        share = self.train.accumulation_steps(world_size) * self.train.micro_batch
        batch = self.train.micro_batch if self.sampling.batch is None else self.sampling.batch
        if share % batch:
            raise ConfigError(f"sampling.batch={batch} does not divide the {share} sequences each of the {world_size} "
                              f"ranks samples per step (train.global_batch={self.train.global_batch})")
        return batch


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file, apply ``key=value`` overrides, validate, and return a ``RunConfig``."""
    return load_dataclass(RunConfig, path, overrides, what="config")


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of the raw run-config mapping with each ``dotted.key=value`` set (value parsed as a YAML
    scalar); a key that is no run-config field is a ConfigError."""
    return config_loader.apply_overrides(RunConfig, raw, overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as a plain mapping (what ``load_config`` reads back to an equal config)."""
    return to_plain(cfg)


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, options))}; got {value!r}")


def _seed(key: str, value: int) -> None:
    # numpy's SeedSequence (per-chunk seeds) and torch.manual_seed take 0 ≤ seed < 2**63.
    if not 0 <= value < 2 ** 63:
        raise ConfigError(f"config key {key!r} must be in [0, 2**63), got {value}")
