"""How a vLLM engine is started on a GPU, computed on the CPU: KV cache from the memory left, CUDA graphs on,
sequences as long as what is sampled; and the planner's vLLM term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fdpg_scale.apps.plan import GIB, load_architecture, plan_memory, resolve_architecture_file
from fdpg_scale.distributed.vllm_engine import (CPU_KV_CACHE_BYTES, VLLM_GPU_OVERHEAD_BYTES, VllmEngineSettings,
                                                engine_kwargs, gpu_kv_cache_bytes, kv_bytes_per_token)
from fdpg_scale.training.config import load_config
from fdpg_scale.training.run_setup import deepspeed_config
from fdpg_scale.training.sampler import longest_prompt

ROOT = Path(__file__).resolve().parents[2]
LLAMA_7B = json.loads((ROOT / "configs/models/llama-7b/config.json").read_text())


def test_kv_bytes_per_token_llama_7b():
    # 2 (K, V) · 32 layers · 32 KV heads · 128 · 2 bytes = 0.5 MiB: a 4096-token sequence needs 2 GiB,
    # four times the old 512 MiB default.
    assert kv_bytes_per_token(LLAMA_7B, 2) == 2 * 32 * 32 * 128 * 2 == 2**19
    assert kv_bytes_per_token(LLAMA_7B, 2) * 4096 == 2 * GIB > CPU_KV_CACHE_BYTES


def test_gpu_kv_cache_is_the_share_of_free_memory_less_weights_and_buffers():
    got = gpu_kv_cache_bytes(free_bytes=60 * GIB, utilization=0.5, weight_bytes=13 * GIB, per_token=2**19,
                             max_model_len=192)
    assert got == 30 * GIB - 13 * GIB - VLLM_GPU_OVERHEAD_BYTES
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.2 .* less than one 4096-token sequence"):
        gpu_kv_cache_bytes(free_bytes=80 * GIB, utilization=0.2, weight_bytes=14 * GIB, per_token=2**19,
                           max_model_len=4096)


def tiny_model_dir(tmp_path: Path) -> Path:
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 64, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(1000, 64), "b": torch.zeros(24)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_engine_kwargs_cpu_and_gpu(tmp_path):
    model = tiny_model_dir(tmp_path)
    cpu = engine_kwargs(model, VllmEngineSettings(), seed=3, on_gpu=False)
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert "max_model_len" not in cpu and cpu["logprobs_mode"] == "processed_logprobs"

    settings = VllmEngineSettings(dtype="bfloat16", max_model_len=200, gpu_memory_utilization=0.5)
    gpu = engine_kwargs(model, settings, seed=3, on_gpu=True, free_bytes=10 * GIB)
    assert gpu["enforce_eager"] is False  # CUDA graphs on a GPU
    assert gpu["max_model_len"] == 200
    weights = (1000 * 64 + 24) * 2  # from the safetensors headers, in the engine's dtype
    assert gpu["kv_cache_memory_bytes"] == 5 * GIB - weights - VLLM_GPU_OVERHEAD_BYTES
    # explicit choices win on either device
    fixed = VllmEngineSettings(kv_cache_bytes=2**20, enforce_eager=True)
    assert engine_kwargs(model, fixed, seed=0, on_gpu=True)["kv_cache_memory_bytes"] == 2**20
    assert engine_kwargs(model, fixed, seed=0, on_gpu=True)["enforce_eager"] is True


def test_max_model_len_is_prompt_plus_new_tokens():
    class Prompts:
        token_ids = ((1, 2, 3), (1, 2, 3, 4, 5))

    assert longest_prompt(None) == 1 and longest_prompt(Prompts()) == 5


def test_config_defaults_resolve_per_device():
    v = load_config(ROOT / "configs/smoke.yaml").sampling.vllm
    assert v.kv_cache_mib is None and v.enforce_eager is None and v.max_model_len is None


def _plan(overrides, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/llama-7b.yaml", overrides)
    arch = load_architecture(resolve_architecture_file(cfg, "configs/llama-7b.yaml", None))
    ds = deepspeed_config(cfg, world_size=8, accumulation=cfg.train.accumulation_steps(8))
    return cfg, arch, plan_memory(cfg, arch, nodes=1, gpus_per_node=8, prompt_tokens=64, ds_config=ds,
                                  gpu_memory_gib=80, reserve_gib=4)


def test_planner_vllm_term(monkeypatch):
    cfg, arch, hf = _plan([], monkeypatch)
    _, _, vllm = _plan(["sampling.engine=vllm"], monkeypatch)
    P, s, batch = hf.parameters, 64 + cfg.sampling.max_new_tokens, cfg.sampling_batch(8)
    assert vllm.gpu["parameters (vLLM copy of q)"] == 2 * P
    assert vllm.gpu["vLLM buffers (activations, CUDA graphs)"] == VLLM_GPU_OVERHEAD_BYTES
    kv = vllm.gpu[f"KV cache (vLLM, at least {batch} sequences of {s} tokens)"]
    assert kv == kv_bytes_per_token(LLAMA_7B, 2) * s * batch
    assert all(vllm.phase[k] == "resident" for k in vllm.gpu if "vLLM" in k)
    assert vllm.phase_total("generation") == 0 < hf.phase_total("generation")  # vLLM samples instead
    assert vllm.phase_total("resident") == hf.phase_total("resident") + 2 * P + VLLM_GPU_OVERHEAD_BYTES + kv
    assert vllm.fits  # 7B with its vLLM copy on 8 × 80 GB
    _, _, fixed = _plan(["sampling.engine=vllm", "sampling.vllm.kv_cache_mib=4096"], monkeypatch)
    assert fixed.gpu["KV cache (vLLM, sampling.vllm.kv_cache_mib=4096)"] == 4 * GIB
