"""LoRA on one frozen ZeRO-3 base: π, q and a share a single set of base weights (``model.lora``).

f-DPG needs three distributions per step. With LoRA all three are one engine (docs/method.md, "LoRA"):

- π = base + the trainable ``"policy"`` adapter (the engine's default state; the optimizer holds only it);
- q = base + the frozen ``"proposal"`` adapter, a copy of an earlier π's adapter (``AdapterView(engine, "proposal")``);
- a = the base with adapters off (``AdapterView(engine, None)``).

An ``AdapterView`` stands wherever a frozen engine stood (``sequence_logprobs``, ``generation.sample_batches``,
the checkpoint's proposal shards, the vLLM refresh): it switches the engine's adapters for the call and
scores under ``no_grad``. Its ``module.named_parameters()`` are its own adapter's parameters only, so the
checkpoint of q is the adapter (kilobytes to megabytes), not a model.

Why the switch sets peft's layer flags itself: peft's public switches (``set_adapter``, ``disable_adapter``)
also flip ``requires_grad`` of the adapters, and under ZeRO-3 the optimizer and the gradient hooks were
fixed when the engine was built: the policy adapter must stay the only trainable tensor. So ``active``
sets each ``BaseTunerLayer``'s ``_active_adapter`` and ``_disable_adapters`` (what those switches set besides
``requires_grad``) and restores them after. The pinned peft release is in requirements/lock.txt.

Shapes: the adapter of a linear layer W [out, in] is A [r, in], B [out, r]; ΔW = (alpha / r) · B A. B starts
at 0, so before the first update π = q = a exactly. q ← π copies A and B shard by shard (``ds_tensor``, this
rank's 1/world slice), never gathering. The lm_head is never a target: the fused log-prob head
(engines.FusedHeadLM) reads its weight directly, gathered as an external parameter.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from fdpg_scale.distributed.settings import LoraSettings
from fdpg_scale.errors import ConfigError

__all__ = ["POLICY", "PROPOSAL", "Adapters", "AdapterView", "attach_adapters", "check_target_modules",
           "adapter_views", "copy_adapter", "gathered_adapter_state", "merged_weights", "lora_weights", "peft_lora_config"]

POLICY, PROPOSAL = "policy", "proposal"
_ADAPTER_PARAM = re.compile(r"\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)\.")


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's fused projections (fan_in_fan_out)

    return nn.Linear, Conv1D


def check_target_modules(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The module-name suffixes that get adapters in ``model`` (``settings.target_modules``, or every linear
    layer's last name but the output head's when null). Raises ConfigError (one line) naming the targets that
    match no linear layer of the model, or a target that is the output head."""
    kinds = _adaptable_types()
    head = model.get_output_embeddings()
    linear = {name for name, m in model.named_modules() if isinstance(m, kinds) and m is not head}
    head_names = {name for name, m in model.named_modules() if m is head}
    last = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if settings.target_modules is None:
        return last
    arch = type(model).__name__

    def matches(target: str, names) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    on_head = [t for t in settings.target_modules if matches(t, head_names)]
    if on_head:
        raise ConfigError(f"model.lora.target_modules: {', '.join(on_head)} is the output head of {arch}; the fused "
                          f"log-prob head reads its weight directly, so it cannot carry an adapter")
    missing = [t for t in settings.target_modules if not matches(t, linear)]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} name no linear layer of {arch} "
                          f"(its linear layers: {', '.join(last)})")
    return list(settings.target_modules)


def peft_lora_config(settings: LoraSettings, targets: list[str], *, fan_in_fan_out: bool):
    """peft's ``LoraConfig`` for these settings (causal LM, no bias terms, plain LoRA init: B = 0).
    fan_in_fan_out: the targets store W as [in, out] (GPT-2's Conv1D)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)


def _fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for n, m in model.named_modules()
               if any(n == t or n.endswith("." + t) for t in targets))


class Adapters:
    """The adapters of one engine's HF model (plain object: not an ``nn.Module``, so nothing is registered twice).

    ``peft_model``: the ``PeftModelForCausalLM`` around the HF model (used for saving and the config);
    ``layers``: every peft tuner layer, whose flags ``active`` switches; ``settings``: the run's LoRA settings.
    """

    def __init__(self, peft_model, settings: LoraSettings, targets: list[str], fan_in_fan_out: bool):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_model, self.settings, self.targets = peft_model, settings, targets
        self.fan_in_fan_out = fan_in_fan_out
        self.layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def active(self, adapter: str | None):
        """The block runs with adapter ``adapter`` on (None: all adapters off, i.e. the base model)."""
        saved = [(m._active_adapter, m._disable_adapters) for m in self.layers]
        for m in self.layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter, m._disable_adapters = [adapter], False
        try:
            yield
        finally:
            for m, (name, off) in zip(self.layers, saved):
                m._active_adapter, m._disable_adapters = name, off

    def config(self, base_path: str):
        """peft's ``LoraConfig`` of one adapter, pointing at ``base_path`` (what ``PeftModel.from_pretrained`` reads)."""
        cfg = peft_lora_config(self.settings, self.targets, fan_in_fan_out=self.fan_in_fan_out)
        cfg.base_model_name_or_path = base_path
        return cfg


def attach_adapters(hf_model: nn.Module, settings: LoraSettings, *, seed: int) -> Adapters:
    """Add the ``"policy"`` (trainable) and ``"proposal"`` (frozen, an exact copy) adapters to ``hf_model`` in place.

    Call before the DeepSpeed engine is built (it partitions the new tensors with the rest). A's random init
    is drawn from ``seed`` alone (the caller's RNG state untouched), so every rank and world size starts from
    the same adapter. Raises ConfigError for targets the model lacks (``check_target_modules``).
    """
    from peft import get_peft_model

    targets = check_target_modules(hf_model, settings)
    fan = _fan_in_fan_out(hf_model, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(hf_model, peft_lora_config(settings, targets, fan_in_fan_out=fan),
                                    adapter_name=POLICY)
        peft_model.add_adapter(PROPOSAL, peft_lora_config(settings, targets, fan_in_fan_out=fan))
    adapters = Adapters(peft_model, settings, targets, fan)
    params = dict(hf_model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            m = _ADAPTER_PARAM.search(name)
            if m and m["adapter"] == PROPOSAL:
                p.copy_(params[_other(name, PROPOSAL, POLICY)])
            # Only the policy adapter trains (peft's add_adapter may have changed the flags).
            p.requires_grad_(bool(m) and m["adapter"] == POLICY)
    for m in adapters.layers:
        m._active_adapter, m._disable_adapters = [POLICY], False
    return adapters


def _other(name: str, src: str, dst: str) -> str:
    return _ADAPTER_PARAM.sub(lambda m: m.group(0).replace(f".{src}.", f".{dst}."), name)


def adapter_parameters(module: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter's tensors in ``module`` (the engine's FusedHeadLM), in module order."""
    return [(n, p) for n, p in module.named_parameters()
            if (m := _ADAPTER_PARAM.search(n)) is not None and m["adapter"] == adapter]


class _RoleModel:
    """The HF model seen as one role: ``generate`` runs with the role's adapters; everything else is the model's."""

    def __init__(self, model: nn.Module, view: "AdapterView"):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_view", view)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):  # e.g. generation.py sets generation_config for the call
        setattr(self._model, name, value)

    def generate(self, *args, **kwargs):
        with self._view.active():
            return self._model.generate(*args, **kwargs)


class _RoleModule:
    """What ``AdapterView.module`` shows: frozen, the role's HF model, and the role's own adapter parameters."""

    trainable = False

    def __init__(self, module: nn.Module, view: "AdapterView"):
        self._module, self._view = module, view
        self.hf_model = _RoleModel(module.hf_model, view)

    def named_parameters(self):
        """This role's adapter tensors (none for the base): what a checkpoint of q holds."""
        return iter([] if self._view.adapter is None else adapter_parameters(self._module, self._view.adapter))

    def parameters(self):
        return (p for _, p in self.named_parameters())


class AdapterView:
    """One frozen role of the LoRA policy engine, usable wherever a frozen engine is: q (``adapter="proposal"``)
    or a (``adapter=None``: adapters off). Calls score under ``no_grad`` in eval mode (no adapter dropout)."""

    def __init__(self, engine, adapter: str | None):
        adapters = getattr(engine.module, "adapters", None)
        if adapters is None:
            raise ValueError("an AdapterView needs an engine built with model.lora (engine.module.adapters is None)")
        if adapter not in (None, PROPOSAL):
            raise ValueError(f"adapter must be None (the base) or {PROPOSAL!r}, got {adapter!r}")
        self.engine, self.adapter, self.adapters = engine, adapter, adapters
        self.module = _RoleModule(engine.module, self)

    @property
    def device(self):
        return self.engine.device

    @property
    def optimizer(self):  # generation.py finds the ZeRO-3 parameter hooks through it
        return self.engine.optimizer

    @contextlib.contextmanager
    def active(self):
        """The engine as this role for the block: its adapters switched, eval mode, the previous state restored."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with self.adapters.active(self.adapter):
                yield
        finally:
            module.train(was_training)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with self.active(), torch.no_grad():
            return self.engine(*args, **kwargs)

    def copy_from(self, policy_engine) -> None:
        """q ← π: the policy adapter's tensors into the proposal's, shard-local (no gather); collective-free."""
        if self.adapter != PROPOSAL or policy_engine is not self.engine:
            raise ValueError("only the proposal view of the same engine takes a copy of the policy adapter")
        copy_adapter(self.engine.module, POLICY, PROPOSAL)


def adapter_views(engine, *, on_policy: bool) -> tuple[AdapterView, AdapterView | None]:
    """(a, q) of a LoRA policy engine: the base view, and the proposal view (None on-policy: q is π)."""
    return AdapterView(engine, None), None if on_policy else AdapterView(engine, PROPOSAL)


@torch.no_grad()
def copy_adapter(module: nn.Module, src: str, dst: str) -> None:
    """Adapter ``dst`` ← adapter ``src`` in ``module``, each rank copying its own ZeRO-3 shard (``ds_tensor``)
    and, for parameters ZeRO keeps whole on every rank, their full data too."""
    from fdpg_scale.distributed.engines import copy_shards

    params = dict(module.named_parameters())
    pairs = [(name, p, params[_other(name, src, dst)]) for name, p in adapter_parameters(module, src)]
    if not pairs:
        raise ValueError(f"the model has no adapter {src!r}")
    copy_shards(pairs)


def gathered_adapter_state(module: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{peft key: full fp32 CPU tensor} of one adapter, gathered with ``GatheredParameters`` (collective).

    Keys are peft's saved names (``base_model.model.<module>.lora_A.weight``, adapter name dropped), as
    ``get_peft_model_state_dict`` writes them: the fix for adapters that come out empty when read from
    ZeRO-3 placeholders without a gather.
    """
    import deepspeed

    out = {}
    for name, p in adapter_parameters(module, adapter):
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[peft_key(name, adapter)] = p.detach().float().cpu().clone()
    return out


def peft_key(name: str, adapter: str) -> str:
    """``hf_model.x.lora_A.<adapter>.weight`` (the engine's name) -> ``base_model.model.x.lora_A.weight`` (peft's)."""
    name = name.removeprefix("hf_model.")
    return "base_model.model." + _ADAPTER_PARAM.sub(lambda m: m.group(0).replace(f".{adapter}.", "."), name)


def merged_weights(module: nn.Module, adapter: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of the model with adapter ``adapter`` merged in (W + ΔW), by the base model's own
    names, gathered one layer at a time (collective; every rank iterates). A tied head is listed under its own
    name too. What a server that knows nothing of adapters (vLLM) loads."""
    import deepspeed
    from peft.tuners.lora import LoraLayer

    hf_model = module.hf_model
    layers = {name: m for name, m in hf_model.named_modules() if isinstance(m, LoraLayer)}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        if _ADAPTER_PARAM.search(name):
            continue
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        layer = layers.get(layer_name) if owner.endswith(".base_layer") else None
        if layer is None or adapter is None or leaf != "weight":
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name.replace(".base_layer.", "."), p.detach()
            continue
        extra = [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        with deepspeed.zero.GatheredParameters([p, *extra], modifier_rank=None):
            yield f"{layer_name}.{leaf}", p.detach() + layer.get_delta_weight(adapter).to(p.dtype)


def lora_weights(engine) -> Iterator[tuple[str, torch.Tensor]] | None:
    """``merged_weights`` of what ``engine`` samples from: a LoRA view (q's adapter; the base for a), or the LoRA
    policy engine itself (π's adapter, on-policy); None for an engine without adapters."""
    if isinstance(engine, AdapterView):
        return merged_weights(engine.engine.module, engine.adapter)
    if getattr(engine.module, "adapters", None) is not None:
        return merged_weights(engine.module, POLICY)
    return None
