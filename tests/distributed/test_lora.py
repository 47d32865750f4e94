"""LoRA on one frozen ZeRO-3 base (distributed/adapters.py), in this one process (a world of 1, gloo).

π = base + the "policy" adapter, q = base + the "proposal" adapter, a = the base with adapters off, all one
engine; checked against a frozen engine of the base loaded alone. The DeepSpeed config keeps no parameter
whole (``stage3_param_persistence_threshold: 0``), so the adapters are partitioned like a large model's and a
read without a gather sees an empty placeholder (the pitfall of adapters exported empty under ZeRO-3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdpg_scale.distributed.settings import LoraSettings
from fdpg_scale.training.config import load_config
from tests.harness import one_rank_zero3, run_cli

ROOT = Path(__file__).resolve().parents[2]
LORA = LoraSettings(r=4, alpha=8.0)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_gpt2):
    """{policy engine with adapters, its q and a views, the base loaded alone as a frozen engine, rows}."""
    from fdpg_scale.distributed.adapters import adapter_views
    from fdpg_scale.distributed.engines import build_frozen, build_policy
    from fdpg_scale.training.run_setup import deepspeed_config

    tmp = tmp_path_factory.mktemp("lora")
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"model.path={tiny_gpt2}", f"output_dir={tmp / 'run'}",
                                                    "train.global_batch=4", "train.micro_batch=4"])
    with one_rank_zero3():
        ds = deepspeed_config(cfg, world_size=1, accumulation=1)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        policy = build_policy(tiny_gpt2, ds, lr=5e-2, lora=LORA, lora_seed=3)
        base, proposal = adapter_views(policy, on_policy=False)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 200, (3, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0                         # a left-padded row
        loss_mask = mask.clone()
        loss_mask[:, :3] = 0
        loss_mask[1, :5] = 0                    # a row's first real token has no context: never scored
        yield {"policy": policy, "q": proposal, "a": base, "alone": build_frozen(tiny_gpt2, ds),
               "rows": (ids, mask, loss_mask), "tmp": tmp, "model": tiny_gpt2}


def _logp(engine, rows) -> torch.Tensor:
    from fdpg_scale.distributed.engines import sequence_logprobs

    with torch.no_grad():
        return sequence_logprobs(engine, *rows).sum(-1).cpu()


def _train_one_step(lora) -> None:
    from fdpg_scale.distributed.engines import sequence_logprobs, train_step

    policy = lora["policy"]
    assert train_step(policy, -sequence_logprobs(policy, *lora["rows"]).sum(-1).mean())


def test_before_the_first_update_pi_q_and_a_are_the_base_loaded_alone(lora):
    rows = lora["rows"]
    alone = _logp(lora["alone"], rows)
    for role in ("policy", "q", "a"):
        torch.testing.assert_close(_logp(lora[role], rows), alone, atol=1e-6, rtol=0)


def test_the_optimizer_holds_the_policy_adapter_and_a_step_moves_only_it(lora):
    from fdpg_scale.distributed.adapters import POLICY, adapter_parameters

    policy, rows = lora["policy"], lora["rows"]
    trainable = [n for n, p in policy.module.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in adapter_parameters(policy.module, POLICY)] and trainable
    held = sum(p.ds_numel for g in policy.optimizer.fp16_groups for p in g)
    assert held == sum(p.ds_numel for _, p in adapter_parameters(policy.module, POLICY))

    _train_one_step(lora)
    alone = _logp(lora["alone"], rows)
    assert (_logp(policy, rows) - alone).abs().max() > 1e-3          # π moved
    torch.testing.assert_close(_logp(lora["a"], rows), alone, atol=1e-6, rtol=0)   # a is still the base
    torch.testing.assert_close(_logp(lora["q"], rows), alone, atol=1e-6, rtol=0)   # q is still the old π


def test_q_takes_pis_adapter_shard_by_shard(lora):
    from fdpg_scale.distributed.engines import copy_policy_into_proposal

    rows = lora["rows"]
    _train_one_step(lora)
    copy_policy_into_proposal(lora["policy"], lora["q"])
    torch.testing.assert_close(_logp(lora["q"], rows), _logp(lora["policy"], rows), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logp(lora["a"], rows), _logp(lora["alone"], rows), atol=1e-6, rtol=0)
    # The checkpoint of q is its adapter alone: every tensor a proposal adapter's.
    names = [n for n, _ in lora["q"].module.named_parameters()]
    assert names and all(".proposal." in n for n in names)


def test_q_generates_with_its_adapter(lora):
    """Rollouts from q's view are q's: the log-probs generate recorded are q's fused scores, not a's."""
    from fdpg_scale.distributed.generation import sample_batches
    from fdpg_scale.distributed.settings import SamplingSettings

    q = lora["q"]
    draws = {mode: sample_batches(q, [[[5, 6], [7]]], SamplingSettings(max_new_tokens=6), seeds=[1], bos_id=0,
                                  eos_id=1, pad_id=1, mode=mode)[0] for mode in ("gathered", "sharded")}
    r = draws["gathered"]
    assert torch.equal(r.input_ids, draws["sharded"].input_ids)   # per-layer gathers (sharded) draw what the gathered model draws
    rows = (r.input_ids, r.attention_mask, r.gen_mask)
    recorded = r.logprobs.sum(-1)
    torch.testing.assert_close(_logp(q, rows), recorded, atol=1e-4, rtol=0)
    assert (_logp(lora["a"], rows) - recorded).abs().max() > 1e-3


def test_merged_weights_load_into_a_plain_model_that_is_q(lora):
    """What vLLM receives (merged_weights): the base's own names, W + ΔW, equal to q as a plain HF model."""
    from transformers import AutoConfig, GPT2LMHeadModel

    from fdpg_scale.core.sequences import position_ids_from_mask
    from fdpg_scale.distributed.adapters import PROPOSAL, merged_weights

    merged = {n: t.clone() for n, t in merged_weights(lora["policy"].module, PROPOSAL)}
    plain = GPT2LMHeadModel(AutoConfig.from_pretrained(lora["model"]))  # no ZeRO: built directly
    assert set(merged) == set(dict(plain.named_parameters(remove_duplicate=False)))
    plain.load_state_dict(merged, strict=False)
    plain.eval()
    ids, mask, loss_mask = lora["rows"]
    position_ids = position_ids_from_mask(mask)
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1]
    per_token = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * loss_mask[:, 1:]
    torch.testing.assert_close(per_token.sum(-1), _logp(lora["q"], lora["rows"]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_exported_adapter_is_the_trained_one_gathered(lora):
    """Placeholders are empty under ZeRO-3; the gathered adapter is full, and export writes exactly it."""
    from safetensors.torch import load_file

    from fdpg_scale.distributed import checkpoint as ckpt
    from fdpg_scale.distributed.adapters import POLICY, adapter_parameters, gathered_adapter_state
    from fdpg_scale.distributed.export import ADAPTER_DIR

    policy, tmp = lora["policy"], lora["tmp"]
    assert all(p.numel() == 0 for _, p in adapter_parameters(policy.module, POLICY))  # what a naive read sees
    trained = gathered_adapter_state(policy.module, POLICY)
    assert trained and all(t.numel() > 0 for t in trained.values())
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in trained.items())  # B starts at 0: it trained
    ckpt.save_checkpoint(tmp / "run", 1, policy=policy, proposal=lora["q"], trainer_state={"step": 1},
                         fingerprint={})
    run_cli("export", str(tmp / "run"), "--to", str(tmp / "hf"), timeout=300)
    exported = load_file(tmp / "hf" / ADAPTER_DIR / "adapter_model.safetensors")
    assert exported.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(exported[k], trained[k], atol=1e-7, rtol=0)
