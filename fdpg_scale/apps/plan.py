"""Per-GPU memory plan of a run config on N nodes × G GPUs (``fdpg-scale plan``).

Where the architecture comes from (first that exists): ``<model.path>/config.json`` (the user's weights
directory), else ``configs/models/<name>/config.json`` shipped with the project, ``<name>`` being ``--arch``
or, without it, the config file's stem (``configs/llama-7b.yaml`` → ``configs/models/llama-7b``).

The parts, per GPU, with P parameters, W = nodes × gpus_per_node ranks, ZeRO-3 partitioning everything
over W, b = bytes of ``model.dtype`` (bf16: 2, fp32: 4):

- policy parameters        P·b / W            (0 on the GPU with ``offload_param``)
- policy gradients         P·b / W
- policy optimizer states  P·(8 + 4·[bf16]) / W   (AdamW m and v in fp32, plus the fp32 master copy when the
                                                   parameters are bf16; 0 on the GPU with ``offload_optimizer``)
- proposal parameters      P·b / W            (a frozen snapshot of the policy; none when ``train.on_policy``)
- base parameters          P·b / W            (the original LM a(x) of the target)
- gathered model           P·b                (``sampling.generation_mode: gathered``: one whole copy during
                                               generation; ``sharded`` gathers one layer at a time: the
                                               largest layer's parameters)
- activations (training)   L·m·s·h·(34 + 5·n·s/h)·b/2   per micro-batch m, sequence s, hidden h, n heads,
                           L layers, no activation checkpointing (Korthikanti et al. 2022, eq. 2, written
                           for 2-byte activations); the lm_head's [m, s, V] logits are never materialised
                           (the fused ``linear_token_logprobs``), so they are not counted
- KV cache (generation)    2·L·n_kv·d_head·s·r·b    for the r = global_batch / W sequences a rank generates

The sequence length s is ``--prompt-tokens`` + ``sampling.max_new_tokens``. A plan is an estimate: the
allocator's fragmentation, the CUDA context and the communication buckets are covered by ``--reserve-gib``.
Offloaded parts are listed as host memory per node.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fdpg_scale.training.config import ConfigError, RunConfig, load_config

__all__ = ["Architecture", "MemoryPlan", "load_architecture", "count_parameters", "plan_memory", "main"]

GIB = 1024 ** 3
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
#: Usable memory of common accelerators, GiB (the ``--gpu`` choices; ``--gpu-memory-gib`` for others).
GPUS = {"h100-80gb": 80, "h200-141gb": 141, "a100-80gb": 80, "a100-40gb": 40, "v100-32gb": 32, "l40s-48gb": 48,
        "a10-24gb": 24}
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


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


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of each part (``gpu``), bytes per node in host memory (``host``), and the verdict."""
    parameters: int
    world_size: int
    seq_len: int
    gpu: dict[str, int]
    host: dict[str, int]
    gpu_memory_gib: float | None
    reserve_gib: float

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gib is None:
            return None
        return self.gpu_total + self.reserve_gib * GIB <= self.gpu_memory_gib * GIB


def plan_memory(cfg: RunConfig, arch: Architecture, *, nodes: int, gpus_per_node: int, prompt_tokens: int,
                ds_config: dict, gpu_memory_gib: float | None = None, reserve_gib: float = 0.0) -> MemoryPlan:
    """The per-GPU memory plan (see the module docstring for each formula)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be ≥ 1, got {nodes} and {gpus_per_node}")
    if prompt_tokens < 0:
        raise ConfigError(f"--prompt-tokens must be ≥ 0, got {prompt_tokens}")
    world = nodes * gpus_per_node
    cfg.train.accumulation_steps(world)  # the same check the trainer makes: raises if the batch does not split
    P = count_parameters(arch)
    b = _DTYPE_BYTES[cfg.model.dtype]
    zero = ds_config.get("zero_optimization", {})
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_par = zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    shard = -(-P // world)  # ZeRO-3 pads each rank's partition up to the ceiling
    opt_bytes = shard * (8 + (4 if b == 2 else 0))
    s = prompt_tokens + cfg.sampling.max_new_tokens
    m = cfg.train.micro_batch
    per_rank_sequences = cfg.train.global_batch // world
    frozen_copies = 1 if cfg.train.on_policy else 2  # base a, plus the proposal q unless it is π_θ itself
    act = arch.layers * m * s * arch.hidden * (34 + 5 * arch.heads * s / arch.hidden) * b / 2
    gathered = P * b if cfg.sampling.generation_mode == "gathered" else layer_parameters(arch) * b
    gpu = {
        "parameters (policy)": 0 if offload_par else shard * b,
        "gradients (policy)": shard * b,
        "optimizer states (policy)": 0 if offload_opt else opt_bytes,
        "parameters (proposal)": 0 if (offload_par or cfg.train.on_policy) else shard * b,
        "parameters (base)": 0 if offload_par else shard * b,
        f"gathered for generation ({cfg.sampling.generation_mode})": gathered,
        "activations (training)": int(act),
        "KV cache (generation)": 2 * arch.layers * arch.kv_heads * arch.head_dim * s * per_rank_sequences * b,
    }
    host = {}
    if offload_par:
        host["parameters (policy, proposal, base)"] = gpus_per_node * shard * b * (1 + frozen_copies)
    if offload_opt:
        host["optimizer states + fp32 master (policy)"] = gpus_per_node * opt_bytes
    return MemoryPlan(parameters=P, world_size=world, seq_len=s, gpu=gpu, host=host,
                      gpu_memory_gib=gpu_memory_gib, reserve_gib=reserve_gib)


def resolve_architecture_file(cfg: RunConfig, config_path: str | Path, arch_name: str | None) -> Path:
    """``<model.path>/config.json`` if present, else ``configs/models/<arch or config stem>/config.json``."""
    own = Path(cfg.model.path) / "config.json"
    if own.is_file():
        return own
    name = arch_name or Path(config_path).stem
    shipped = _PROJECT_ROOT / "configs" / "models" / name / "config.json"
    if shipped.is_file():
        return shipped
    known = sorted(p.name for p in (_PROJECT_ROOT / "configs" / "models").iterdir() if p.is_dir())
    raise ConfigError(f"no architecture for {str(config_path)!r}: {own} does not exist and there is no "
                      f"configs/models/{name}/config.json (pass --arch, one of {', '.join(known)})")


def format_plan(plan: MemoryPlan, arch: Architecture, *, nodes: int, gpus_per_node: int) -> str:
    """The report ``fdpg-scale plan`` prints."""
    lines = [f"architecture: {arch.source} ({arch.family}, {plan.parameters:,} parameters)",
             f"world: {nodes} node(s) × {gpus_per_node} GPU(s) = {plan.world_size} ranks; "
             f"sequence length {plan.seq_len}",
             "per GPU:"]
    width = max(len(k) for k in (*plan.gpu, *plan.host)) + 2
    for key, value in plan.gpu.items():
        lines.append(f"  {key:<{width}} {value / GIB:9.3f} GiB")
    lines.append(f"  {'total':<{width}} {plan.gpu_total / GIB:9.3f} GiB")
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


def _check_numbers(args: argparse.Namespace) -> None:
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


def main(argv: list[str]) -> int:
    """``fdpg-scale plan --config FILE --nodes N --gpus-per-node G [--gpu NAME | --gpu-memory-gib X] [k=v ...]``."""
    parser = argparse.ArgumentParser(prog="fdpg-scale plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--arch", help="name under configs/models/ (default: the config file's stem) when "
                                       "model.path has no config.json")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length added to "
                                                                      "sampling.max_new_tokens (default 64)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", choices=sorted(GPUS), help="check the fit against this GPU")
    gpu.add_argument("--gpu-memory-gib", type=float, help="check the fit against this much memory per GPU")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="kept free for the CUDA context, allocator fragmentation, buckets (default 4)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
