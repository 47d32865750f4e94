"""Model-size configs load and validate; the memory planner's counts match real models built on ``meta``."""

import json
from pathlib import Path

import pytest
import torch

from fdpg_scale.training.config import load_config
from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.apps.plan import GIB, PHASES, count_parameters, load_architecture, plan_memory, resolve_architecture_file
from fdpg_scale.training.run_setup import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
SIZES = ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1.5b", "llama-1b", "llama-7b"]
# Published sizes, for a sanity band on the name (the exact check is against the built model below).
NOMINAL = {"gpt2-124m": 124e6, "gpt2-355m": 355e6, "gpt2-774m": 774e6, "gpt2-1.5b": 1.56e9,
           "llama-1b": 1.24e9, "llama-7b": 6.74e9}


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their DeepSpeed JSON relative to the project root


def test_every_size_has_a_config_and_architecture():
    found = [p.stem for p in ROOT.glob("configs/gpt2-*.yaml")] + [p.stem for p in ROOT.glob("configs/llama-*.yaml")]
    # The LoRA configs (tests/apps/test_plan_lora.py) train these sizes' architectures, and llama-70b.
    assert sorted(f for f in found if not f.endswith("-lora")) == sorted(SIZES)
    assert sorted(p.name for p in (ROOT / "configs/models").iterdir()) == sorted([*SIZES, "llama-70b"])


@pytest.mark.parametrize("name", SIZES)
def test_config_loads_and_validates(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.dtype == "bf16" and cfg.model.build is None
    assert cfg.model.path == f"models/{name}"  # the documented placeholder convention
    raw = json.loads(Path(cfg.deepspeed.config).read_text())
    assert raw["zero_optimization"]["stage"] == 3 and raw["bf16"]["enabled"] is True
    for world in (1, 8, 16):
        ds = deepspeed_config(cfg, world_size=world, accumulation=cfg.train.accumulation_steps(world))
        assert ds["train_batch_size"] == cfg.train.global_batch
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds[
            "train_batch_size"]


@pytest.mark.parametrize("name", SIZES)
def test_parameter_count_matches_built_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = ROOT / "configs/models" / name / "config.json"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent))
    built = sum(p.numel() for p in model.parameters())
    planned = count_parameters(load_architecture(path))
    assert planned == built, f"{name}: planner {planned:,} vs built {built:,}"
    assert abs(built / NOMINAL[name] - 1) < 0.03, f"{name}: {built:,} is not the advertised size"


def _plan(name, world=8, overrides=(), **kw):
    cfg = load_config(f"configs/{name}.yaml", list(overrides))
    arch = load_architecture(resolve_architecture_file(cfg, f"configs/{name}.yaml", None))
    ds = deepspeed_config(cfg, world_size=world, accumulation=cfg.train.accumulation_steps(world))
    return cfg, arch, plan_memory(cfg, arch, nodes=1, gpus_per_node=world, prompt_tokens=kw.pop("prompt_tokens", 64),
                                  ds_config=ds, **kw)


def test_plan_arithmetic_and_sharding():
    cfg, arch, one = _plan("gpt2-124m", 1, ["sampling.batch=8"], prompt_tokens=32)
    _, _, four = _plan("gpt2-124m", 4, ["sampling.batch=8"], prompt_tokens=32)
    P = count_parameters(arch)
    assert one.gpu["parameters (policy)"] == 2 * P and one.gpu["optimizer states (policy)"] == 12 * P
    assert one.gpu["gradients (policy)"] == 4 * P  # bf16 parameters, gradients accumulated in fp32
    assert four.gpu["parameters (policy)"] == 2 * -(-P // 4)
    # unsharded parts do not shrink with the world; the KV cache follows the sequences of one generate call
    assert four.gpu["gathered for generation (gathered)"] == one.gpu["gathered for generation (gathered)"] == 2 * P
    assert four.gpu["activations (training)"] == one.gpu["activations (training)"]
    s = 32 + cfg.sampling.max_new_tokens
    assert one.gpu["KV cache (generation, 8 sequences)"] == four.gpu["KV cache (generation, 8 sequences)"] \
        == 2 * arch.layers * arch.hidden * s * 8 * 2
    assert one.gpu["fused head backward (dW fp32 + cast, dh)"] == arch.vocab * arch.hidden * 6 \
        + cfg.train.micro_batch * s * arch.hidden * 4
    # the peak is the resident parts plus the largest phase, not the sum of every phase
    assert one.gpu_total == one.phase_total("resident") + max(one.phase_total(p) for p in PHASES)
    assert one.gpu_total < sum(one.gpu.values())


def test_optimizer_step_transients_and_grad_accum_dtype():
    _, arch, plan = _plan("llama-7b", 8, ["deepspeed.config=configs/deepspeed/zero3_bf16.json"])
    shard = -(-count_parameters(arch) // 8)
    # fp32 gradients: one fp32 flat copy of the sub-group (1e9 ≥ shard) + AdamW's fp32 temporary
    assert plan.gpu["optimizer-step transients"] == shard * 8
    assert 4 * GIB < plan.gpu["optimizer-step transients"] < 8 * GIB  # the +4–8 GB a 7B step adds on 8 GPUs
    bf16_accum = {k: v for k, v in json.loads(Path("configs/deepspeed/zero3_bf16.json").read_text()).items()
                  if k != "data_types"}
    cfg, arch, _ = _plan("llama-7b", 8)
    lean = plan_memory(cfg, arch, nodes=1, gpus_per_node=8, prompt_tokens=64, ds_config=bf16_accum)
    assert lean.gpu["optimizer-step transients"] == shard * 10 and lean.gpu["gradients (policy)"] == shard * 2


def test_bf16_jsons_accumulate_in_fp32_and_offload_uses_deepspeed_cpu_adam():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from fdpg_scale.distributed.engines import client_adamw_class

    for path in sorted(Path("configs/deepspeed").glob("*.json")):
        raw = json.loads(path.read_text())
        if raw["bf16"]["enabled"]:
            assert raw["data_types"]["grad_accum_dtype"] == "fp32", path
        offloaded = raw["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
        assert client_adamw_class(raw) is (DeepSpeedCPUAdam if offloaded else torch.optim.AdamW), path
        assert "zero_force_ds_cpu_optimizer" not in raw, path  # DeepSpeed itself refuses a slow host optimizer


# Fastest first: no offload beats moving states over PCIe; gathered generation (one gather per rollout) beats
# sharded (an all-gather of the model for every token).
SPEED_ORDER = [(json_name, mode) for mode in ("gathered", "sharded")
               for json_name in ("zero3_bf16", "zero3_bf16_offload_optimizer", "zero3_bf16_offload_all")]


@pytest.mark.parametrize("name", SIZES)
def test_size_config_is_the_fastest_that_fits_8x80gb(name):
    cfg = load_config(f"configs/{name}.yaml")
    chosen = (Path(cfg.deepspeed.config).stem, cfg.sampling.generation_mode)
    assert chosen in SPEED_ORDER
    for option in SPEED_ORDER[:SPEED_ORDER.index(chosen) + 1]:
        _, _, plan = _plan(name, 8, [f"deepspeed.config=configs/deepspeed/{option[0]}.json",
                                     f"sampling.generation_mode={option[1]}"], gpu_memory_gib=80, reserve_gib=4)
        assert plan.fits is (option == chosen), (name, option, plan.gpu_total / GIB)
    # generate calls larger than the micro-batch, valid on the 8 and the 16 GPUs the configs mention
    assert cfg.sampling_batch(8) == cfg.sampling_batch(16) == cfg.sampling.batch >= cfg.train.micro_batch


def test_offload_moves_states_to_host():
    _, _, plan = _plan("llama-7b", 8, ["deepspeed.config=configs/deepspeed/zero3_bf16_offload_all.json"],
                       gpu_memory_gib=80, reserve_gib=4)
    shard = -(-plan.parameters // 8)
    assert plan.gpu["optimizer states (policy)"] == 0 and plan.gpu["parameters (policy)"] == 0
    assert plan.gpu["gradients (policy)"] == 0 and plan.gpu["optimizer-step transients"] == 0
    assert plan.host["optimizer states + fp32 master + gradients (policy)"] == 8 * (12 + 4) * shard


def main(argv):
    """``fdpg-scale plan ARGV``, in this process."""
    return cli_main(["plan", *argv])


def test_cli_fit_verdict_and_errors(capsys, tmp_path):
    assert main(["--config", "configs/llama-7b.yaml", "--nodes", "2", "--gpus-per-node", "8", "--gpu",
                 "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "fits: yes" in out and "KV cache" in out
    for part in ("optimizer-step transients", "live-parameter cache", "fused head backward", "peak = resident + "):
        assert part in out
    # without offload and gathered generation, a 7B model does not fit a 24 GiB card
    assert main(["--config", "configs/llama-7b.yaml", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib",
                 "24", "deepspeed.config=configs/deepspeed/zero3_bf16.json", "sampling.generation_mode=gathered"]) == 1
    assert "fits: NO" in capsys.readouterr().out
    assert main(["--config", "configs/gpt2-124m.yaml", "--nodes", "1", "--gpus-per-node", "3"]) == 2
    assert "not a multiple of train.micro_batch × world size" in capsys.readouterr().err
    odd = tmp_path / "mystery.yaml"
    odd.write_text((ROOT / "configs/gpt2-124m.yaml").read_text())
    assert main(["--config", str(odd), "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "pass --arch" in capsys.readouterr().err
    assert main(["--config", str(odd), "--nodes", "1", "--gpus-per-node", "1", "--arch", "gpt2-124m"]) == 0
