"""Model-size configs load and validate; the memory planner's counts match real models built on ``meta``."""

import json
from pathlib import Path

import pytest
import torch

from fdpg_scale.training.config import load_config
from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.apps.plan import count_parameters, load_architecture, plan_memory, resolve_architecture_file
from fdpg_scale.training.run_setup import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
SIZES = ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1.5b", "llama-1b", "llama-7b"]
# Published sizes, for a sanity band on the name (the exact check is against the built model below).
NOMINAL = {"gpt2-124m": 124e6, "gpt2-355m": 355e6, "gpt2-774m": 774e6, "gpt2-1.5b": 1.56e9,
           "llama-1b": 1.24e9, "llama-7b": 6.74e9}


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their DeepSpeed JSON relative to the project root


def test_every_size_has_a_config_and_architecture():
    found = [p.stem for p in ROOT.glob("configs/gpt2-*.yaml")] + [p.stem for p in ROOT.glob("configs/llama-*.yaml")]
    assert sorted(found) == sorted(SIZES)
    assert sorted(p.name for p in (ROOT / "configs/models").iterdir()) == sorted(SIZES)


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


def test_plan_arithmetic_and_sharding():
    cfg = load_config("configs/gpt2-124m.yaml")
    arch = load_architecture(resolve_architecture_file(cfg, "configs/gpt2-124m.yaml", None))
    P = count_parameters(arch)
    plans = {}
    for world in (1, 4):
        ds = deepspeed_config(cfg, world_size=world, accumulation=cfg.train.accumulation_steps(world))
        plans[world] = plan_memory(cfg, arch, nodes=1, gpus_per_node=world, prompt_tokens=32, ds_config=ds)
    one, four = plans[1].gpu, plans[4].gpu
    assert one["parameters (policy)"] == 2 * P and one["optimizer states (policy)"] == 12 * P
    assert four["parameters (policy)"] == 2 * -(-P // 4)
    # unsharded parts do not shrink with the world; the KV cache follows the sequences each rank generates
    assert four["gathered for generation (gathered)"] == one["gathered for generation (gathered)"] == 2 * P
    assert four["activations (training)"] == one["activations (training)"]
    s = 32 + cfg.sampling.max_new_tokens
    assert one["KV cache (generation)"] == 2 * arch.layers * arch.hidden * s * cfg.train.global_batch * 2
    assert four["KV cache (generation)"] * 4 == one["KV cache (generation)"]


def test_offload_moves_states_to_host():
    cfg = load_config("configs/llama-7b.yaml")
    arch = load_architecture(resolve_architecture_file(cfg, "configs/llama-7b.yaml", None))
    ds = deepspeed_config(cfg, world_size=8, accumulation=cfg.train.accumulation_steps(8))
    plan = plan_memory(cfg, arch, nodes=1, gpus_per_node=8, prompt_tokens=64, ds_config=ds, gpu_memory_gib=80,
                       reserve_gib=4)
    assert plan.gpu["optimizer states (policy)"] == 0 and plan.gpu["parameters (policy)"] == 0
    assert plan.host["optimizer states + fp32 master (policy)"] == 8 * 12 * -(-plan.parameters // 8)


def main(argv):
    """``fdpg-scale plan ARGV``, in this process."""
    return cli_main(["plan", *argv])


def test_cli_fit_verdict_and_errors(capsys, tmp_path):
    assert main(["--config", "configs/llama-7b.yaml", "--nodes", "2", "--gpus-per-node", "8", "--gpu",
                 "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "fits: yes" in out and "KV cache" in out
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
