"""Per-GPU memory plan of a run config on N nodes × G GPUs (``fdpg-scale plan``).

Where the architecture comes from (first that exists): ``<model.path>/config.json`` (the user's weights
directory), else ``configs/models/<name>/config.json`` shipped with the project, ``<name>`` being ``--arch``
or, without it, the config file's stem (``configs/llama-7b.yaml`` → ``configs/models/llama-7b``).

The parts, per GPU, with P parameters, W = nodes × gpus_per_node ranks, ZeRO-3 partitioning everything
over W (shard = ⌈P/W⌉), b = bytes of ``model.dtype`` (bf16: 2, fp32: 4), g = bytes of the gradient
accumulation dtype (the DeepSpeed JSON's ``data_types.grad_accum_dtype``, else the model's dtype).
Resident all along:

- policy parameters        shard·b            (0 on the GPU with ``offload_param``)
- policy gradients         shard·g            (ZeRO-3's flat gradient partition; host memory with
                                               ``offload_optimizer``)
- policy optimizer states  shard·(8 + 4·[bf16])   (AdamW m and v in fp32, plus the fp32 master copy when the
                                                   parameters are bf16; host memory with ``offload_optimizer``)
- proposal parameters      shard·b            (a frozen snapshot of the policy; none when ``train.on_policy``)
- base parameters          shard·b            (the original LM a(x) of the target)
- gradient reduce bucket   reduce_bucket_size·g
- model scorers            P_s·b_s for each ``hf-classifier`` / ``hf-reward-model`` of the target: every rank holds
                           a full, unpartitioned copy; P_s is counted from its safetensors headers, b_s is its
                           ``scorer_args.dtype``, else ``model.dtype`` (its no-grad forward, one batch of texts, is
                           small beside the policy's training activations and is not counted)

Then one phase at a time, so the peak is the resident parts plus the largest phase:

- with ``sampling.engine: vllm`` instead of the generation phase below, resident: the engine's full copy of
  q, P·b; its own buffers (activations, CUDA graphs), an allowance of VLLM_GPU_OVERHEAD_BYTES; its KV cache,
  ``sampling.vllm.kv_cache_mib`` or else at least 2·L·n_kv·d_head·s'·B·b for the B sequences of one call,
  s' = ``sampling.vllm.max_model_len`` or s (the engine takes more when free memory allows);
- generation: the gathered model P·b (``sampling.generation_mode: gathered``; ``sharded`` gathers about one
  layer at a time: the largest layer's parameters); the KV cache 2·L·n_kv·d_head·s·B·b for the
  B = ``sampling.batch`` sequences of one generate call; the fp32 [B, V] logits of a step, ×4 (generate's
  fp32 copy, the warped scores, the probabilities, the recorded log-probs);
- training (scoring, forward and backward of a micro-batch): ZeRO-3's live-parameter cache,
  min(stage3_max_live_parameters, P)·b plus the prefetch bucket stage3_prefetch_bucket_size·b; the
  activations L·m·s·h·(34 + 5·n·s/h)·b/2 per micro-batch m, sequence s, hidden h, n heads, L layers
  (Korthikanti et al. 2022, eq. 2, written for 2-byte activations), or with ``train.gradient_checkpointing``
  the block inputs L·m·s·h·b plus one block's activations; the fused head's backward buffers: dW in fp32
  and its cast to the weight's dtype, V·H·(4 + b), plus dh, m·s·H·4. The lm_head's [m, s, V] logits are never
  materialised (``linear_token_logprobs``), so they are not counted;
- optimizer step (not offloaded): ZeRO-3 flattens the gradients of one sub-group (min(shard,
  sub_group_size) elements) into an fp32 copy (4 B, plus a 2 B flatten before the cast when g = 2) and
  torch AdamW keeps one fp32 temporary (its denominator), 4 B more per element.

The sequence length s is ``--prompt-tokens`` + ``sampling.max_new_tokens``. A plan is an estimate: the
allocator's fragmentation, the CUDA context and NCCL's buffers are covered by ``--reserve-gib``.
Offloaded parts are listed as host memory per node. With ``model.lora`` the three models' parameters and the
policy's gradients and optimizer states are replaced by one base and two adapters (apps/plan_lora.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fdpg_scale.apps.plan_lora import lora_parts
from fdpg_scale.models.hub import local_dir, looks_like_hub_id, resolve_hub_snapshot
from fdpg_scale.training.config import ConfigError, RunConfig, load_config

__all__ = ["Architecture", "MemoryPlan", "PHASES", "load_architecture", "count_parameters", "plan_memory",
           "scorer_parts", "stored_parameters", "run"]

GIB = 1024 ** 3
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
_SCORER_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}   # a model scorer may also run in fp16
_MODEL_SCORERS = ("hf-classifier", "hf-reward-model")
#: Bytes per parameter of AdamW's two fp32 moments (m and v), and of the fp32 master copy kept for bf16.
_ADAM_MOMENT_BYTES, _FP32_MASTER_BYTES = 8, 4
#: Activation bytes per layer are L·m·s·h·(34 + 5·n·s/h) for 2-byte activations (Korthikanti et al. 2022).
_ACT_LINEAR, _ACT_ATTENTION = 34, 5
#: Usable memory of common accelerators, GiB (the ``--gpu`` choices; ``--gpu-memory-gib`` for others).
GPUS = {"h100-80gb": 80, "h200-141gb": 141, "a100-80gb": 80, "a100-40gb": 40, "v100-32gb": 32, "l40s-48gb": 48,
        "a10-24gb": 24}
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # fdpg_scale/apps/plan.py -> the checkout


@dataclass(frozen=True)
class Architecture:
    """The shape of a causal LM, read from a Hugging Face config.json (GPT-2 or Llama family)."""
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    positions: int
    """Learned position embeddings (GPT-2); 0 for rotary (Llama)."""
    tied: bool
    source: str


def load_architecture(config_json: str | Path) -> Architecture:
    """Parse a config.json of ``model_type`` gpt2 or llama; raises ConfigError naming the file otherwise."""
    path = Path(config_json)
    raw = json.loads(path.read_text())
    kind = raw.get("model_type")
    if kind == "gpt2":
        h = raw["n_embd"]
        return Architecture(family="gpt2", vocab=raw["vocab_size"], hidden=h, layers=raw["n_layer"],
                            heads=raw["n_head"], kv_heads=raw["n_head"], head_dim=h // raw["n_head"],
                            intermediate=raw.get("n_inner") or 4 * h, positions=raw["n_positions"],
                            tied=raw.get("tie_word_embeddings", True), source=str(path))
    if kind == "llama":
        h, n = raw["hidden_size"], raw["num_attention_heads"]
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError(f"{path}: attention_bias/mlp_bias are not modelled by the planner")
        return Architecture(family="llama", vocab=raw["vocab_size"], hidden=h, layers=raw["num_hidden_layers"],
                            heads=n, kv_heads=raw.get("num_key_value_heads") or n,
                            head_dim=raw.get("head_dim") or h // n, intermediate=raw["intermediate_size"],
                            positions=0, tied=raw.get("tie_word_embeddings", False), source=str(path))
    raise ConfigError(f"{path}: model_type {kind!r} is not one the planner knows (gpt2, llama)")


def layer_parameters(arch: Architecture) -> int:
    """Parameters of one transformer block."""
    h, d = arch.hidden, arch.head_dim
    if arch.family == "gpt2":
        # ln_1, ln_2 (weight+bias); c_attn [h, 3h] + bias; c_proj [h, h] + bias; mlp c_fc [h, 4h] + bias, c_proj back
        return 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * arch.intermediate + arch.intermediate) \
            + (arch.intermediate * h + h)
    # Llama: q, o [h, n·d]; k, v [h, n_kv·d]; gate, up, down [h, I]; two RMSNorm weights
    return 2 * h * arch.heads * d + 2 * h * arch.kv_heads * d + 3 * h * arch.intermediate + 2 * h


def count_parameters(arch: Architecture) -> int:
    """Total parameters (a tied lm_head counted once), as ``sum(p.numel() for p in model.parameters())``."""
    embed = arch.vocab * arch.hidden + arch.positions * arch.hidden
    final_norm = 2 * arch.hidden if arch.family == "gpt2" else arch.hidden
    head = 0 if arch.tied else arch.vocab * arch.hidden
    return embed + arch.layers * layer_parameters(arch) + final_norm + head


PHASES = ("generation", "training", "optimizer step")
"""The phases of a step that never overlap in time; everything else is resident."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of each part (``gpu``; ``phase`` says which are resident and which belong to one phase
    of the step), bytes per node in host memory (``host``), and the verdict."""
    parameters: int
    world_size: int
    seq_len: int
    gpu: dict[str, int]
    phase: dict[str, str]
    """Part name → ``resident`` or one of ``PHASES``."""
    host: dict[str, int]
    gpu_memory_gib: float | None
    reserve_gib: float

    def phase_total(self, phase: str) -> int:
        return sum(v for k, v in self.gpu.items() if self.phase[k] == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def gpu_total(self) -> int:
        """The peak: the resident parts plus the largest phase."""
        return self.phase_total("resident") + self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gib is None:
            return None
        return self.gpu_total + self.reserve_gib * GIB <= self.gpu_memory_gib * GIB


def grad_accum_bytes(cfg: RunConfig, ds_config: dict) -> int:
    """Bytes per element of ZeRO-3's gradient partitions: ``data_types.grad_accum_dtype``, else model.dtype."""
    name = ds_config.get("data_types", {}).get("grad_accum_dtype")
    known = {None: _DTYPE_BYTES[cfg.model.dtype], "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2}
    if name not in known:
        raise ConfigError(f"deepspeed.config data_types.grad_accum_dtype {name!r} is not one the planner knows "
                          f"(fp32, bf16)")
    return known[name]


def plan_memory(cfg: RunConfig, arch: Architecture, *, nodes: int, gpus_per_node: int, prompt_tokens: int,
                ds_config: dict, gpu_memory_gib: float | None = None, reserve_gib: float = 0.0) -> MemoryPlan:
    """The per-GPU memory plan (see the module docstring for each formula)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be ≥ 1, got {nodes} and {gpus_per_node}")
    if prompt_tokens < 0:
        raise ConfigError(f"--prompt-tokens must be ≥ 0, got {prompt_tokens}")
    world = nodes * gpus_per_node
    sampling_batch = cfg.sampling_batch(world)  # the trainer's checks: the batch splits over the world
    P = count_parameters(arch)
    b = _DTYPE_BYTES[cfg.model.dtype]
    g = grad_accum_bytes(cfg, ds_config)
    zero = ds_config.get("zero_optimization", {})
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_par = zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    shard = -(-P // world)  # ZeRO-3 pads each rank's partition up to the ceiling
    opt_bytes = shard * (_ADAM_MOMENT_BYTES + (_FP32_MASTER_BYTES if b == 2 else 0))
    s = prompt_tokens + cfg.sampling.max_new_tokens
    m = cfg.train.micro_batch
    h, L = arch.hidden, arch.layers
    frozen_copies = 1 if cfg.train.on_policy else 2  # base a, plus the proposal q unless it is π_θ itself
    per_block = m * s * h * (_ACT_LINEAR + _ACT_ATTENTION * arch.heads * s / h) * b / 2
    if cfg.train.gradient_checkpointing:  # block inputs kept, one block's activations recomputed at a time
        act = L * m * s * h * b + per_block
    else:
        act = L * per_block
    gathered = P * b if cfg.sampling.generation_mode == "gathered" else layer_parameters(arch) * b
    live = min(int(zero.get("stage3_max_live_parameters", 10 ** 9)), P) + int(
        zero.get("stage3_prefetch_bucket_size", 5 * 10 ** 7))
    sub_group = min(shard, int(zero.get("sub_group_size", 10 ** 9)))
    parts = {
        "parameters (policy)": ("resident", 0 if offload_par else shard * b),
        "gradients (policy)": ("resident", 0 if offload_opt else shard * g),
        "optimizer states (policy)": ("resident", 0 if offload_opt else opt_bytes),
        "parameters (proposal)": ("resident", 0 if (offload_par or cfg.train.on_policy) else shard * b),
        "parameters (base)": ("resident", 0 if offload_par else shard * b),
        "gradient reduce bucket": ("resident", int(zero.get("reduce_bucket_size", 5 * 10 ** 8)) * g),
        **{key: ("resident", size) for key, size in scorer_parts(cfg).items()},
        **(_vllm_parts(cfg, arch, P=P, seq_len=s, sampling_batch=sampling_batch, b=b)
           if cfg.sampling.engine == "vllm" else {
            f"gathered for generation ({cfg.sampling.generation_mode})": ("generation", gathered),
            f"KV cache (generation, {sampling_batch} sequences)": (
                "generation", 2 * L * arch.kv_heads * arch.head_dim * s * sampling_batch * b),
            "logits (generation, fp32)": ("generation", 4 * sampling_batch * arch.vocab * 4)}),
        "live-parameter cache (ZeRO-3)": ("training", live * b),
        "activations (training)": ("training", int(act)),
        "fused head backward (dW fp32 + cast, dh)": ("training", arch.vocab * h * (4 + b) + m * s * h * 4),
        "optimizer-step transients": ("optimizer step", 0 if offload_opt else sub_group * (4 + (2 if g == 2 else 0) + 4)),
    }
    if cfg.model.lora is not None:  # one frozen base for π, q and a, plus two adapters (apps/plan_lora.py)
        parts = lora_parts(parts, arch, cfg.model.lora, parameters=P, world=world, b=b, g=g,
                           on_policy=cfg.train.on_policy, offload_par=offload_par, offload_opt=offload_opt,
                           sub_group_size=int(zero.get("sub_group_size", 10 ** 9)))
        frozen_copies, opt_bytes = 0, 0   # offloaded: the one base; the adapter's states are negligible
    host = {}
    if offload_par:
        host["parameters (policy, proposal, base)"] = gpus_per_node * shard * b * (1 + frozen_copies)
    if offload_opt:
        host["optimizer states + fp32 master + gradients (policy)"] = gpus_per_node * (opt_bytes + shard * g)
    return MemoryPlan(parameters=P, world_size=world, seq_len=s, gpu={k: v for k, (_, v) in parts.items()},
                      phase={k: ph for k, (ph, _) in parts.items()}, host=host,
                      gpu_memory_gib=gpu_memory_gib, reserve_gib=reserve_gib)


def scorer_parts(cfg: RunConfig) -> dict[str, int]:
    """{part name: bytes per GPU} of the target's model scorers (``hf-classifier``, ``hf-reward-model``): a full copy
    per rank of P_s parameters in the scorer's dtype. One-line ConfigError when a scorer's weights are not on this
    machine (the planner counts them from the files)."""
    target = cfg.target
    entries = ([(f"target.scorers[{i}]", e.scorer, e.scorer_args, e.name) for i, e in enumerate(target.scorers)]
               if target.scorers else [("target", target.scorer, target.scorer_args, None)])
    parts = {}
    for where, scorer, args, name in entries:
        if scorer not in _MODEL_SCORERS:
            continue
        path = args.get("path")
        if not isinstance(path, str):
            raise ConfigError(f"{where}.scorer_args: {scorer} needs a path (a directory or a Hub id)")
        dtype = args.get("dtype") or cfg.model.dtype
        if dtype not in _SCORER_DTYPE_BYTES:
            raise ConfigError(f"{where}.scorer_args.dtype must be one of {', '.join(_SCORER_DTYPE_BYTES)}, got "
                              f"{dtype!r}")
        n = stored_parameters(local_dir(path, where=f"{where}.scorer_args.path"), where=f"{where} {scorer} {path!r}")
        parts[f"scorer {name or scorer} ({path}, {n:,} parameters, {dtype})"] = n * _SCORER_DTYPE_BYTES[dtype]
    return parts


def stored_parameters(model_dir: Path, *, where: str) -> int:
    """Parameters in ``model_dir``'s safetensors weights (``model.safetensors`` or the shards its index names),
    read from each file's header (8 bytes of header length, then JSON of every tensor's shape): no tensor loads."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise ConfigError(f"{where}: no model.safetensors (or sharded index) in {model_dir}: the planner counts a "
                          f"scorer's parameters from its safetensors files")
    total = 0
    for f in files:
        with open(f, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def _vllm_parts(cfg: RunConfig, arch: Architecture, *, P: int, seq_len: int, sampling_batch: int,
                b: int) -> dict[str, tuple[str, int]]:
    """The vLLM engine's resident parts (``sampling.engine: vllm``), which replace the hf generation phase.

    The engine keeps a full copy of q (P·b), its own buffers (VLLM_GPU_OVERHEAD_BYTES) and a KV cache:
    ``sampling.vllm.kv_cache_mib`` when set, else at least what one generate call's ``sampling_batch``
    sequences of ``seq_len`` tokens need (the engine then takes more if the free memory allows:
    distributed/vllm_engine.gpu_kv_cache_bytes).
    """
    from fdpg_scale.distributed.vllm_engine import VLLM_GPU_OVERHEAD_BYTES

    v = cfg.sampling.vllm
    if v.kv_cache_mib is not None:
        kv_key, kv = f"KV cache (vLLM, sampling.vllm.kv_cache_mib={v.kv_cache_mib})", v.kv_cache_mib * 2**20
    else:
        length = v.max_model_len or seq_len
        kv_key = f"KV cache (vLLM, at least {sampling_batch} sequences of {length} tokens)"
        kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * length * sampling_batch * b
    return {"parameters (vLLM copy of q)": ("resident", P * b),
            "vLLM buffers (activations, CUDA graphs)": ("resident", VLLM_GPU_OVERHEAD_BYTES),
            kv_key: ("resident", kv)}


def resolve_architecture_file(cfg: RunConfig, config_path: str | Path, arch_name: str | None) -> Path:
    """``<model.path>/config.json`` if present (a Hub id: in its cached snapshot), else
    ``configs/models/<arch or config stem>/config.json`` (a ``-lora`` stem: its model's, e.g. llama-7b-lora → llama-7b)."""
    own = Path(cfg.model.path) / "config.json"
    if not own.parent.exists() and looks_like_hub_id(cfg.model.path):
        try:
            own = resolve_hub_snapshot(cfg.model.path, where="model.path") / "config.json"
        except ConfigError:   # not cached: plan from the shipped architecture files, as for a missing directory
            pass
    if own.is_file():
        return own
    name = arch_name or Path(config_path).stem
    shipped = _PROJECT_ROOT / "configs" / "models" / name / "config.json"
    if shipped.is_file():
        return shipped
    base = _PROJECT_ROOT / "configs" / "models" / name.removesuffix("-lora") / "config.json"
    if arch_name is None and base.is_file():  # configs/llama-7b-lora.yaml: LoRA on the llama-7b architecture
        return base
    known = sorted(p.name for p in (_PROJECT_ROOT / "configs" / "models").iterdir() if p.is_dir())
    raise ConfigError(f"no architecture for {str(config_path)!r}: {own} does not exist and there is no "
                      f"configs/models/{name}/config.json (pass --arch, one of {', '.join(known)})")


def format_plan(plan: MemoryPlan, arch: Architecture, *, nodes: int, gpus_per_node: int) -> str:
    """The report ``fdpg-scale plan`` prints: the resident parts, then each phase, then the peak."""
    lines = [f"architecture: {arch.source} ({arch.family}, {plan.parameters:,} parameters)",
             f"world: {nodes} node(s) × {gpus_per_node} GPU(s) = {plan.world_size} ranks; "
             f"sequence length {plan.seq_len}",
             "per GPU:"]
    width = max(len(k) for k in (*plan.gpu, *plan.host)) + 4
    for phase in ("resident", *PHASES):
        lines.append(f"  {phase}{' (peak phase)' if phase == plan.peak_phase else ''}:")
        for key, value in plan.gpu.items():
            if plan.phase[key] == phase:
                lines.append(f"    {key:<{width - 2}} {value / GIB:9.3f} GiB")
        lines.append(f"    {'= ' + phase:<{width - 2}} {plan.phase_total(phase) / GIB:9.3f} GiB")
    lines.append(f"  {'peak = resident + ' + plan.peak_phase:<{width}} {plan.gpu_total / GIB:9.3f} GiB")
    if plan.host:
        lines.append("host memory per node (offloaded):")
        for key, value in plan.host.items():
            lines.append(f"  {key:<{width}} {value / GIB:9.3f} GiB")
    if plan.fits is None:
        lines.append("fits: not checked (give --gpu or --gpu-memory-gib)")
    else:
        need = plan.gpu_total / GIB + plan.reserve_gib
        lines.append(f"fits: {'yes' if plan.fits else 'NO'} ({need:.2f} GiB needed incl. {plan.reserve_gib:g} GiB "
                     f"reserve, {plan.gpu_memory_gib:g} GiB per GPU)")
    return "\n".join(lines)


def _check_numbers(args) -> None:
    """The numeric flags, checked before anything multiplies or divides by them: a bad GPU count would
    otherwise be blamed on the batch size, and --nodes 0 would divide by zero."""
    for flag, value, low in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1),
                             ("--prompt-tokens", args.prompt_tokens, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be ≥ {low}, got {value}")
    if args.gpu_memory_gib is not None and not 0 < args.gpu_memory_gib < math.inf:
        raise ConfigError(f"--gpu-memory-gib must be a finite number > 0, got {args.gpu_memory_gib}")
    if not 0 <= args.reserve_gib < math.inf:
        raise ConfigError(f"--reserve-gib must be a finite number ≥ 0, got {args.reserve_gib}")



def run(args) -> int:
    """``fdpg-scale plan --config FILE --nodes N --gpus-per-node G [--gpu NAME | --gpu-memory-gib X] [k=v ...]``
    (arguments parsed by ``fdpg_scale.apps.cli``): 0 when it fits or was not checked, 1 when it does not."""
    from fdpg_scale.training.run_setup import deepspeed_config

    try:
        _check_numbers(args)
        cfg = load_config(args.config, args.overrides)
        arch = load_architecture(resolve_architecture_file(cfg, args.config, args.arch))
        world = args.nodes * args.gpus_per_node
        ds = deepspeed_config(cfg, world_size=world, accumulation=cfg.train.accumulation_steps(world))
        memory = GPUS[args.gpu] if args.gpu else args.gpu_memory_gib
        plan = plan_memory(cfg, arch, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           prompt_tokens=args.prompt_tokens, ds_config=ds, gpu_memory_gib=memory,
                           reserve_gib=args.reserve_gib)
    except ConfigError as err:
        print(f"fdpg-scale plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, arch, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
    return 0 if plan.fits in (None, True) else 1
