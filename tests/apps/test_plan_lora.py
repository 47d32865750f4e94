"""``fdpg-scale plan`` with ``model.lora``: the adapter count matches peft's, and the LoRA configs fit their
hardware with at least 15% headroom (where full fine-tuning of the same model does not)."""

from pathlib import Path

import pytest
import torch

from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.apps.plan import GIB, load_architecture, plan_memory, resolve_architecture_file
from fdpg_scale.apps.plan_lora import adapter_parameters
from fdpg_scale.distributed.settings import LoraSettings
from fdpg_scale.training.config import load_config
from fdpg_scale.training.run_setup import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
HEADROOM, RESERVE_GIB, GPU_GIB = 0.15, 4.0, 80


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _plan(name, world, overrides=()):
    cfg = load_config(f"configs/{name}.yaml", list(overrides))
    arch = load_architecture(resolve_architecture_file(cfg, f"configs/{name}.yaml", None))
    ds = deepspeed_config(cfg, world_size=world, accumulation=cfg.train.accumulation_steps(world))
    return plan_memory(cfg, arch, nodes=1, gpus_per_node=world, prompt_tokens=64, ds_config=ds,
                       gpu_memory_gib=GPU_GIB, reserve_gib=RESERVE_GIB)


@pytest.mark.parametrize("arch_name, targets", [("llama-1b", None), ("llama-1b", ("q_proj", "v_proj")),
                                                ("gpt2-124m", None), ("gpt2-124m", ("c_proj",))])
def test_adapter_count_matches_peft(arch_name, targets):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from fdpg_scale.distributed.adapters import check_target_modules, peft_lora_config

    lora = LoraSettings(r=8, target_modules=targets)
    path = ROOT / "configs/models" / arch_name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        names = check_target_modules(model, lora)
        peft_model = get_peft_model(model, peft_lora_config(lora, names, fan_in_fan_out=arch_name.startswith("gpt2")))
    built = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert adapter_parameters(load_architecture(path / "config.json"), lora) == built


@pytest.mark.parametrize("name, world", [("llama-7b-lora", 1), ("llama-70b-lora", 8)])
def test_lora_config_fits_with_headroom_where_full_fine_tuning_does_not(name, world):
    plan = _plan(name, world)
    need = plan.gpu_total / GIB + RESERVE_GIB
    assert plan.fits and need <= (1 - HEADROOM) * GPU_GIB, (name, need)
    assert any("shared by π, q and a" in k for k in plan.gpu) and not any(k == "parameters (base)" for k in plan.gpu)
    assert not _plan(name, world, ["model.lora=null"]).fits


def test_plan_cli_says_the_lora_configs_fit(capsys):
    for name, gpus in (("llama-7b-lora", "1"), ("llama-70b-lora", "8")):
        assert cli_main(["plan", "--config", f"configs/{name}.yaml", "--nodes", "1", "--gpus-per-node", gpus,
                         "--gpu", "h100-80gb"]) == 0
        assert "fits: yes" in capsys.readouterr().out


def test_a_target_the_planner_does_not_know_is_one_line(capsys):
    assert cli_main(["plan", "--config", "configs/llama-7b-lora.yaml", "--nodes", "1", "--gpus-per-node", "1",
                     "model.lora.target_modules=[q_proj,c_attn]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "c_attn is no llama linear layer" in err, err
