"""``model.lora`` through the CLI: bad values are one line; real runs on 1 and 2 ranks agree, resume on another
world size equals the straight run, and export loads both ways (merged model and PEFT adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdpg_scale import cli
from fdpg_scale.errors import EXIT_BAD_INPUT
from fdpg_scale.training import loop
from fdpg_scale.training.preflight import preflight
from tests.harness import metrics, one_line, run_cli, run_train, side_by_side

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"

BAD = [
    ("model.lora.r=0", "model.lora.r must be an int ≥ 1"),
    ("model.lora.r=2.5", "model.lora.r"),
    ("model.lora.alpha=-1", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout must be in [0, 1)"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.lora.target_modules=[c_attn,c_attn]", "names a module twice"),
    ("model.lora.target_modules=[q_proj,c_attn,v_proj]", "q_proj, v_proj name no linear layer of GPT2LMHeadModel"),
    ("model.lora.target_modules=[lm_head]", "lm_head is the output head"),
    ("model.lora.rank=8", "unknown config key 'model.lora.rank'"),
    ("model.lora.r=8 train.inference_copies=true", "set train.inference_copies=false with model.lora"),
]


@pytest.mark.parametrize("override, culprit", BAD, ids=[b[0] for b in BAD])
def test_a_bad_lora_value_is_one_line(override, culprit, tiny_gpt2, tmp_path, monkeypatch, capsys):
    # Everything `train` does before it starts an engine (the target modules are checked on the meta device).
    monkeypatch.setattr(loop, "train", lambda cfg: preflight(cfg, world_size=1))
    capsys.readouterr()
    status = cli.main(["train", "--config", str(SMOKE), f"model.path={tiny_gpt2}", f"output_dir={tmp_path}", *override.split()])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT and culprit in line, (status, line)


def test_default_targets_are_every_linear_layer_but_the_head(tiny_gpt2):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fdpg_scale.distributed.adapters import check_target_modules
    from fdpg_scale.distributed.settings import LoraSettings

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_gpt2))
    assert check_target_modules(model, LoraSettings()) == ["c_attn", "c_fc", "c_proj"]


STEPS = ("model.lora.r=8", "train.steps=4", "train.save_every=2", "logging.tensorboard=false")


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_runs_on_one_and_two_ranks_resume_across_world_sizes_and_export_both_ways(tiny_gpt2, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # Steps 1-2 on 2 ranks, step 3 resumed on 2 ranks, step 4 resumed on 1 rank: both resume paths of
    # load_checkpoint (the same world size loads DeepSpeed's shards non-strictly; another one reshards).
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    side_by_side(lambda: run_train(straight, *STEPS, model=tiny_gpt2, nproc=1),
                 lambda: run_train(moved, *STEPS[:1], "train.steps=2", *STEPS[2:], model=tiny_gpt2, nproc=2))
    log = run_train(moved, *STEPS[:1], "train.steps=3", *STEPS[2:], model=tiny_gpt2, nproc=2)
    assert "world 2" in log and "resumed at step 2" in log, log[-3000:]
    log = run_train(moved, *STEPS, model=tiny_gpt2, nproc=1)
    assert "world 1" in log and "resumed at step 3" in log, log[-3000:]
    a, b = metrics(straight), metrics(moved)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    assert a[-1]["proposal_version"] >= 1   # q was replaced by π at least once (the adapter copy)
    for x, y in zip(a, b):   # measured: 2 ranks against 1 equal to 2e-15, and exactly after either resume
        for key in ("loss", "log_z", "kl_p_pi", "kl_pi_a", "proposal_version"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key, x[key], y[key])
    ckpt = straight / "checkpoints" / "step_00000004"
    weights = sum(f.stat().st_size for f in (ckpt / "policy").rglob("*.pt"))
    model_bytes = (tiny_gpt2 / "model.safetensors").stat().st_size
    assert weights < model_bytes, (weights, model_bytes)  # the adapters and their Adam moments, not the base

    to = tmp_path / "hf"   # the run that moved between world sizes, exported both ways
    run_cli("export", str(moved), "--to", str(to), timeout=300)
    merged = AutoModelForCausalLM.from_pretrained(to).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), to / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3   # the adapter is not empty
    adapter = load_file(to / "adapter" / "adapter_model.safetensors")
    assert adapter and any("lora_B" in k and t.abs().max() > 0 for k, t in adapter.items())

@pytest.mark.slow
def test_vllm_samples_q_from_merged_weights(tmp_path):
    """sampling.engine=vllm with LoRA: the engine gets the base with q's adapter merged in at every replacement,
    so the log q it records stays the q view's rescored log q (a stale or wrong merge would show as a mismatch
    once the adapter has moved)."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed (scripts/setup.sh installs it)")
    from tests.helpers import vllm_tiny_gpt2

    model = vllm_tiny_gpt2(tmp_path / "gpt2-2heads")
    out = tmp_path / "run"
    text = run_train(out, "model.build=null", "model.lora.r=8", "model.lora.alpha=64", "sampling.engine=vllm",
                     "sampling.vllm.kv_cache_mib=64", "train.steps=3", "train.save_every=3", "train.lr=1e-2",
                     "logging.tensorboard=false", model=model)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3], text[-3000:]
    replaced = [r["step"] for r in rows if r["proposal_replaced"]]
    assert replaced and replaced[0] < 3, rows
    after = [r for r in rows if r["step"] > replaced[0]]
    assert all("time/refresh" in r for r in rows if r["step"] - 1 in replaced)
    for r in after:   # q moved away from the base by then: its merged weights are what vLLM sampled from
        assert abs(r["logq_mismatch_mean"]) < 1e-3 and r["logq_mismatch_std"] < 1e-3, r
    assert rows[-1]["kl_pi_a"] != 0.0
