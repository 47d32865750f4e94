"""The sampler's settings, declared once: the run config's ``sampling:`` section derives from them.

Kept apart from ``generation`` and ``vllm_engine`` because neither torch nor vLLM is needed to check them: the
CLI reads configs (``plan``, every command's ``--help``) without loading either.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["SamplingSettings", "VllmEngineOptions", "LoraSettings"]


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How the proposal samples; these settings define q(x) itself (see distributed/generation.py)."""
    max_new_tokens: int = 16
    """Tokens generated after the prompt (a sequence may end sooner, at EOS)."""
    temperature: float = 1.0
    """Divides the logits before the softmax: q(x_t | x_<t) ∝ exp(z_t / T)."""
    top_k: int = 0
    """Keep only the k most likely tokens at each step; 0 disables top-k truncation."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1.0 disables nucleus truncation."""

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int ≥ 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int ≥ 1, got {self.max_new_tokens!r}")

    def sampling_settings(self) -> SamplingSettings:
        """These settings alone (a subclass, such as the run config's section, drops its other fields)."""
        return SamplingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)})


@dataclass(frozen=True, kw_only=True)
class VllmEngineOptions:
    """How a vLLM engine is started, as a user chooses it (``sampling.vllm.*`` in the run config); the engine's
    full settings (``vllm_engine.VllmEngineSettings``) add what the run derives: dtype and KV-cache bytes."""
    gpu_memory_utilization: float = 0.3
    """On a GPU with no KV-cache size given: the fraction of the memory still free when the engine starts
    (after the ZeRO-3 engines) that it may take for its weights, its own buffers and its KV cache; the rest
    stays for training's phases. Ignored on CPU."""
    max_model_len: int | None = None
    """Longest prompt + continuation the engine serves; null: the model's context length (the run config
    passes the longest prompt + ``sampling.max_new_tokens``)."""
    enforce_eager: bool | None = None
    """No CUDA graphs / torch.compile in the engine; null: eager on CPU (starts fast), CUDA graphs on GPUs."""

    def __post_init__(self):
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be ≥ 2 or null, got {self.max_model_len}")

    def engine_options(self) -> dict:
        """These options alone, as keyword arguments (a subclass drops its other fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(VllmEngineOptions)}


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """LoRA adapters on one frozen base (distributed/adapters.py): π = base + a trainable adapter, q = base + a
    frozen copy of an earlier π's adapter, a = base with adapters off. The run config's ``model.lora``."""
    r: int = 8
    """Rank of each adapter's low-rank update ΔW = (alpha / r) · B A, with A [r, in] and B [out, r]."""
    alpha: float = 16.0
    """Scale numerator of the update (peft's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while π trains. 0 keeps log π one deterministic function of θ (the
    f-DPG weights compare log π with log q of the same sequence); > 0 makes the training log π a noisy one."""
    target_modules: tuple[str, ...] | None = None
    """Module names (or name suffixes, e.g. ``c_attn``, ``q_proj``) that get adapters; null: every linear
    layer but the output head. The head itself is never a target: the fused log-prob head reads its weight."""

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"r must be an int ≥ 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            names = list(self.target_modules)
            if not names or any(not isinstance(n, str) or not n.strip() for n in names):
                raise ValueError(f"target_modules must be a non-empty list of module names or null, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"target_modules names a module twice: {names!r}")

