"""The LoRA terms of ``fdpg-scale plan`` (``model.lora``): one frozen base for π, q and a, plus two adapters.

With LoRA the three models of a full run become one (distributed/adapters.py), so the resident parts per GPU
are, with P base parameters, A adapter parameters (one adapter), W ranks, b / g as in plan.py:

- base parameters                  ⌈P/W⌉·b          (shared by π = base + policy adapter, q = base + proposal
                                                    adapter, and a = base with adapters off)
- adapter parameters               ⌈A/W⌉·b·k        k = 2 (policy and proposal), 1 on-policy
- policy adapter gradients         ⌈A/W⌉·g
- policy adapter optimizer states  ⌈A/W⌉·(8 + 4·[bf16])

and the optimizer step's transients cover the adapter's sub-group only. A = Σ over the targeted linear layers of
r·(in + out) (A [r, in], B [out, r]). The phases (generation, training) are the full model's: a forward still
runs every base layer, and generation still gathers the base (plus the small adapters, not counted).
"""

from __future__ import annotations

from fdpg_scale.distributed.settings import LoraSettings
from fdpg_scale.errors import ConfigError

__all__ = ["linear_shapes", "adapter_parameters", "lora_parts"]


def linear_shapes(arch) -> dict[str, list[tuple[int, int]]]:
    """{module name: [(in, out) of each such layer in one block]} of the linear layers LoRA can target."""
    h, d, inter = arch.hidden, arch.head_dim, arch.intermediate
    if arch.family == "gpt2":
        # "c_proj" names both the attention output and the MLP's down projection
        return {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (inter, h)], "c_fc": [(h, inter)]}
    return {"q_proj": [(h, arch.heads * d)], "k_proj": [(h, arch.kv_heads * d)], "v_proj": [(h, arch.kv_heads * d)],
            "o_proj": [(arch.heads * d, h)], "gate_proj": [(h, inter)], "up_proj": [(h, inter)],
            "down_proj": [(inter, h)]}


def adapter_parameters(arch, lora: LoraSettings) -> int:
    """A: parameters of one adapter (every block's targeted layers); ConfigError naming targets the planner
    does not know for this family."""
    shapes = linear_shapes(arch)
    targets = list(shapes) if lora.target_modules is None else list(lora.target_modules)
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in shapes]
    if unknown:
        raise ConfigError(f"model.lora.target_modules: {', '.join(unknown)} is no {arch.family} linear layer the "
                          f"planner knows ({', '.join(shapes)})")
    per_block = sum(lora.r * (i + o) for t in targets for i, o in shapes[t.rsplit(".", 1)[-1]])
    return arch.layers * per_block


def lora_parts(parts: dict[str, tuple[str, int]], arch, lora: LoraSettings, *, parameters: int, world: int, b: int,
               g: int, on_policy: bool, offload_par: bool, offload_opt: bool,
               sub_group_size: int) -> dict[str, tuple[str, int]]:
    """``parts`` (plan.py's full fine-tuning parts, name → (phase, bytes)) with the three models' resident
    parameters, gradients, optimizer states and step transients replaced by the LoRA ones (module docstring)."""
    A = adapter_parameters(arch, lora)
    shard, ad_shard = -(-parameters // world), -(-A // world)
    opt = ad_shard * (8 + (4 if b == 2 else 0))
    replaced = {
        "parameters (policy)": ("parameters (base, shared by π, q and a)", 0 if offload_par else shard * b),
        "gradients (policy)": ("gradients (policy adapter)", 0 if offload_opt else ad_shard * g),
        "optimizer states (policy)": ("optimizer states (policy adapter)", 0 if offload_opt else opt),
        "parameters (proposal)": (f"parameters (adapters: {'policy' if on_policy else 'policy + proposal'}, "
                                  f"{A:,} each)", ad_shard * b * (1 if on_policy else 2)),
        "parameters (base)": None,
        "optimizer-step transients": ("optimizer-step transients",
                                      0 if offload_opt else min(ad_shard, sub_group_size) * (4 + (2 if g == 2 else 0) + 4)),
    }
    out = {}
    for key, (phase, value) in parts.items():
        if key not in replaced:
            out[key] = (phase, value)
        elif replaced[key] is not None:
            name, new = replaced[key]
            out[name] = (phase, new)
    return out
