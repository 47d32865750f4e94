"""The one seam to DeepSpeed ZeRO-3: build the engines, score sequences through the fused head, step, copy q ← π.

Three engines, all ZeRO-3 (every rank holds 1/world of every parameter, from load time on):

- the policy π_θ (``build_policy``): trainable, an AdamW client optimizer (torch's; DeepSpeedCPUAdam when the
  optimizer is offloaded) unless the DeepSpeed config names its own, LR warm-up then constant/cosine;
- the proposal q and the base model a (``build_frozen``): no optimizer, ``requires_grad`` off.

Each engine wraps an unmodified transformers causal LM in ``FusedHeadLM``, whose forward returns per-token
log-probs log π(x_t | x_<t) computed by ``fdpg_scale.kernels.linear_token_logprobs`` from the last hidden
state and the lm_head weight, so no [B, T, V] logits tensor is ever made.

Why the wrapper (the ZeRO-3 subtlety): a ZeRO-3 parameter holds only its shard (``ds_tensor``) except while a
module that owns it runs its forward (a pre-forward hook all-gathers it, a post-forward hook frees it) and
its gradient is reduce-scattered by hooks. Calling the fused op on ``lm_head.weight`` outside the lm_head
module's forward would read an empty tensor (or, for GPT-2's tied head, whatever the embedding left).
``FusedHeadLM`` registers the head weight as an *external parameter* of itself
(``deepspeed.zero.register_external_parameter``), so the engine gathers it for the whole of the wrapper's
forward and again in its backward, where the gradient hooks fire as for any other parameter. Tied heads
(GPT-2: lm_head.weight IS wte.weight) need nothing more: one parameter, two uses, one summed gradient.

Sequence layout used throughout (also by generation.py): ``input_ids`` [B, T] left-padded prompts followed
by the generated tokens; ``attention_mask`` [B, T] (1 = real token); ``loss_mask`` [B, T] (1 = score this
token). Per-token outputs are aligned with ``input_ids``: out[b, t] = log p(x_t | x_<t), 0 where
``loss_mask`` is 0 and at t = 0 (nothing conditions it).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fdpg_scale.core.lr_schedule import SCHEDULES, lr_factor
from fdpg_scale.core.sequences import position_ids_from_mask
from fdpg_scale.errors import ConfigError
from fdpg_scale.kernels import linear_token_logprobs
from fdpg_scale.kernels.reference import IGNORE_INDEX

__all__ = ["FusedHeadLM", "build_policy", "build_frozen", "sequence_logprobs", "train_step",
           "copy_policy_into_proposal", "copy_shards", "position_ids_from_mask", "check_ds_config", "client_adamw_class",
           "without_dropout"]

class FusedHeadLM(nn.Module):
    """A causal LM whose forward gives per-token log-probs through the fused head (see module docstring).

    ``hf_model``: the transformers model (``.generate`` and ``.save_pretrained`` are used through it).
    ``trainable``: False for the frozen proposal/base (their scoring runs under ``torch.no_grad``).
    """

    def __init__(self, hf_model: nn.Module, *, trainable: bool, keepalive: Any = None, adapters: Any = None):
        super().__init__()
        self.hf_model = hf_model
        self.trainable = trainable
        self.adapters = adapters  # adapters.Adapters with model.lora (π, q and a on this one base), else None
        # transformers reads ZeRO-3 status from a weak reference to this object (is_deepspeed_zero3_enabled,
        # e.g. generate's synced_gpus default): keep it alive as long as the engine.
        self._hf_ds_config = keepalive
        head = hf_model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(hf_model).__name__} has no output embedding (lm_head) to fuse")
        self._head = [head]  # a list: not a submodule of this wrapper a second time
        import deepspeed

        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None and hasattr(p, "ds_id"):
                deepspeed.zero.register_external_parameter(self, p)

    def train(self, mode: bool = True) -> "FusedHeadLM":
        """The HF model follows the mode (its gradient checkpointing only runs when ``training`` is set);
        dropout is off anyway, its probabilities are 0 in the model's config (``_load_zero3``): log π must be
        one deterministic function of θ, the same when q samples, when π is scored and when the ratios π/q
        and π/p are formed."""
        return super().train(mode)

    @property
    def lm_head(self) -> nn.Module:
        return self._head[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
        """input_ids, attention_mask, loss_mask [B, T] -> float32 [B, T] log softmax(logits/T)[x_t] (see top)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        for name, m in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
            if m.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(m.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        body = self.hf_model.base_model  # GPT-2: .transformer, Llama: .model (after the final norm)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)
        head = self.lm_head
        out = linear_token_logprobs(hidden[:, :-1], head.weight, targets, bias=getattr(head, "bias", None),
                                    temperature=temperature)
        return torch.nn.functional.pad(out, (1, 0))


def check_ds_config(ds_config: Mapping, source: str = "ds_config") -> dict:
    """A deep copy of the DeepSpeed JSON ``ds_config`` after the checks this seam relies on.

    ZeRO stage 3 (every engine here assumes partitioned parameters), no ``"auto"`` anywhere (DeepSpeed only
    resolves it inside the HF Trainer and silently drops it elsewhere), no fp16 (unsupported by DeepSpeed on
    CPU; bf16 or fp32). Raises ConfigError naming ``source`` (e.g. the JSON file) and the dotted key.
    """
    if not isinstance(ds_config, Mapping):
        raise ConfigError(f"{source} must be a dict (DeepSpeed JSON), got {type(ds_config).__name__}")
    _reject_auto(ds_config, source, "")
    stage = ds_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"{source}: zero_optimization.stage must be 3 (this seam assumes partitioned "
                          f"parameters), got {stage!r}")
    if ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: fp16 is not supported (use bf16 or fp32)")
    return copy.deepcopy(dict(ds_config))


def _reject_auto(node, source: str, where: str) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            _reject_auto(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _reject_auto(value, source, f"{where}[{i}]")
    elif node == "auto":
        raise ConfigError(f"{source}: {where} is \"auto\"; DeepSpeed drops \"auto\" outside the HF Trainer: "
                          f"write an explicit value")


def _param_dtype(ds_config: Mapping) -> torch.dtype:
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def without_dropout(config) -> list[str]:
    """Set every dropout probability of a transformers config to 0 in place (GPT-2: ``attn_pdrop``,
    ``resid_pdrop``, ``embd_pdrop``, ``summary_first_dropout``; Llama: ``attention_dropout``...); -> the keys set."""
    keys = [k for k, v in vars(config).items()
            if isinstance(v, float) and (k.endswith("pdrop") or k.endswith("dropout") or k.endswith("dropout_prob"))]
    for k in keys:
        setattr(config, k, 0.0)
    return keys


def _load_zero3(model_dir: str | Path, ds_config: dict, *, trainable: bool,
                gradient_checkpointing: bool = False, lora=None, lora_seed: int = 0) -> FusedHeadLM:
    """from_pretrained under HfDeepSpeedConfig: zero.Init partitions each tensor as it is loaded. ``lora``
    (``LoraSettings``): the policy and proposal adapters are added (adapters.py), partitioned with the rest
    when the engine is built."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {model_dir} is not a Hugging Face model directory (no config.json)")
    keepalive = HfDeepSpeedConfig(ds_config)
    config = AutoConfig.from_pretrained(model_dir)
    without_dropout(config)  # see FusedHeadLM.train: no dropout anywhere, whatever the module's mode
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=_param_dtype(ds_config))
    hf_model.config.use_cache = True
    hf_model.eval()
    adapters = None
    if lora is not None:
        from fdpg_scale.distributed.adapters import attach_adapters

        adapters = attach_adapters(hf_model, lora, seed=lora_seed)
    if gradient_checkpointing:
        # Non-reentrant: the recomputation re-runs each block's forward, whose ZeRO-3 hooks gather again.
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        hf_model.requires_grad_(False)
    return FusedHeadLM(hf_model, trainable=trainable, keepalive=keepalive, adapters=adapters).train(trainable)


def _lr_lambda(schedule: str, warmup_steps: int, total_steps: int | None):
    """The LambdaLR factor of step s: ``fdpg_scale.core.lr_schedule.lr_factor`` (the project's one schedule)."""
    return functools.partial(lr_factor, warmup_steps=warmup_steps, schedule=schedule, total_steps=total_steps)


def client_adamw_class(ds_config: Mapping) -> type:
    """The AdamW the policy's client optimizer is built from: DeepSpeed's multi-threaded, vectorised
    ``DeepSpeedCPUAdam`` (decoupled weight decay, ``adamw_mode`` on by default) when the DeepSpeed config
    offloads the optimizer to the host (torch's AdamW would step the whole model there on one thread), else
    ``torch.optim.AdamW`` on the device."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if device in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW


def build_policy(model_dir: str | Path, ds_config: Mapping, *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 lr_schedule: str = "constant", total_steps: int | None = None, gradient_checkpointing: bool = False,
                 lora=None, lora_seed: int = 0):
    """The trainable policy π_θ as a ZeRO-3 DeepSpeed engine around ``FusedHeadLM``.

    ds_config: DeepSpeed JSON as a dict with explicit values (batch sizes and ``gradient_accumulation_steps``
    filled in by the caller; ``zero_optimization.stage`` 3). Unless it has an ``optimizer`` section, an AdamW
    (weight decay on matrices only; ``client_adamw_class``: DeepSpeedCPUAdam when the optimizer is offloaded)
    is the client optimizer (needs ``zero_allow_untested_optimizer``);
    unless it has a ``scheduler`` section, the LR warms up linearly over ``warmup_steps`` optimizer steps
    (factor (s+1)/warmup_steps at step s), then stays constant (``lr_schedule="constant"``) or follows a cosine
    to 0 at ``total_steps`` (``fdpg_scale.core.lr_schedule``).
    gradient_checkpointing: recompute each block's activations in the backward (transformers' own
    checkpointing, active while the engine is in train mode). lora: ``LoraSettings`` (adapters.py: the base is
    frozen, the optimizer holds the "policy" adapter only; A's init drawn from ``lora_seed``). Returns the engine; ``engine.module`` is the
    FusedHeadLM, ``engine.module.hf_model`` the HF model.
    """
    import deepspeed

    cfg = check_ds_config(ds_config)
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
    if lr_schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"lr_schedule='cosine' needs total_steps > warmup_steps={warmup_steps}, got {total_steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    module = _load_zero3(model_dir, cfg, trainable=True, gradient_checkpointing=gradient_checkpointing, lora=lora,
                         lora_seed=lora_seed)
    optimizer = scheduler = None
    if "optimizer" not in cfg:
        if not cfg.get("zero_allow_untested_optimizer"):
            raise ValueError("ds_config needs \"zero_allow_untested_optimizer\": true for the torch AdamW client "
                             "optimizer (or an \"optimizer\" section)")
        params = [p for p in module.parameters() if p.requires_grad]
        # ZeRO-3 parameters report their full shape in ds_shape (p.shape is the freed placeholder).
        decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        # Empty groups left out (ZeRO-3 drops them, and the LR scheduler's groups must match): LoRA has no vectors.
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        optimizer = client_adamw_class(cfg)(groups, lr=lr, betas=betas, eps=eps)
    if "scheduler" not in cfg:
        if optimizer is None:
            raise ValueError("ds_config names an optimizer but no scheduler: add a \"scheduler\" section (the "
                             "built-in warm-up/cosine schedule needs the client optimizer)")
        # Built on the client optimizer: ZeRO-3 keeps its param_group dicts (it only swaps their 'params').
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(lr_schedule, warmup_steps, total_steps))
    trainable = [p for p in module.parameters() if p.requires_grad]  # for an optimizer DeepSpeed builds
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=cfg,
                                           model_parameters=trainable if optimizer is None else None)
    return engine


def build_frozen(model_dir: str | Path, ds_config: Mapping):
    """A frozen ZeRO-3 engine (no optimizer, eval mode, ``requires_grad`` off) for the base a or proposal q.

    ds_config: as for ``build_policy``; its optimizer/scheduler sections are ignored.
    """
    import deepspeed

    cfg = check_ds_config(ds_config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    module = _load_zero3(model_dir, cfg, trainable=False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=cfg)
    return engine


def sequence_logprobs(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                      *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log p(x_t | x_<t) [B, T] float32 from any of the engines (0 outside ``loss_mask``).

    Sum over T for the sequence log-prob. Differentiable for the policy; frozen engines run under no_grad.
    Inputs [B, T] are moved to the engine's device.
    """
    dev = engine.device
    with torch.set_grad_enabled(engine.module.trainable and torch.is_grad_enabled()):
        return engine(input_ids.to(dev), attention_mask.to(dev), loss_mask.to(dev), temperature)


def train_step(engine, loss: torch.Tensor) -> bool:
    """Backward of one micro-batch's ``loss`` and an optimizer step at accumulation boundaries.

    DeepSpeed divides the loss by ``gradient_accumulation_steps`` and averages gradients over ranks, so pass
    the mean loss of this rank's micro-batch. Returns True when this call completed an optimizer step.
    """
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    engine.step()
    return boundary


def _zero_params(engine) -> list[tuple[str, nn.Parameter]]:
    return list(engine.module.named_parameters())


@torch.no_grad()
def copy_policy_into_proposal(policy_engine, proposal_engine) -> None:
    """q ← π: copy each rank's own parameter shard of the policy into the proposal's matching shard.

    No gather and no state-dict round trip: ``ds_tensor`` (this rank's 1/world flat slice) is copied locally.
    Persistent parameters (ZeRO keeps small ones whole on every rank) also get their full data copied.
    Both engines must come from the same architecture and world size (checked by name and shard shape).
    With LoRA the proposal is a view of the policy engine: its adapter takes the policy adapter's shards.
    """
    from fdpg_scale.distributed.adapters import AdapterView

    if isinstance(proposal_engine, AdapterView):
        proposal_engine.copy_from(policy_engine)
        return
    src, dst = _zero_params(policy_engine), _zero_params(proposal_engine)
    if [n for n, _ in src] != [n for n, _ in dst]:
        raise ValueError("policy and proposal have different parameter names: not the same architecture")
    copy_shards([(name, p, q) for (name, p), (_, q) in zip(src, dst)])


@torch.no_grad()
def copy_shards(pairs) -> None:
    """dst ← src for each (name, src, dst) of ZeRO-3 parameters: this rank's shard, plus the full data where
    ZeRO keeps the parameter whole (no gather; shard shapes checked)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for name, p, q in pairs:
        if not (hasattr(p, "ds_tensor") and hasattr(q, "ds_tensor")):
            raise ValueError(f"parameter {name} is not a ZeRO-3 partitioned parameter in both engines")
        if p.ds_tensor.shape != q.ds_tensor.shape or p.ds_shape != q.ds_shape:
            raise ValueError(f"parameter {name}: policy shard {tuple(p.ds_tensor.shape)} (full {tuple(p.ds_shape)}) "
                             f"!= proposal shard {tuple(q.ds_tensor.shape)} (full {tuple(q.ds_shape)})")
        q.ds_tensor.copy_(p.ds_tensor)
        if q.ds_status == ZeroParamStatus.AVAILABLE:
            if p.ds_status != ZeroParamStatus.AVAILABLE:
                raise RuntimeError(f"parameter {name} is gathered in the proposal but not in the policy")
            q.data.copy_(p.data)
