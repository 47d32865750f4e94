"""Worker for tests/distributed/test_zero3.py: many ZeRO-3 checks in one multi-process run (start-ups are costly).

argv: OUT_DIR GPT2_DIR LLAMA_DIR. Each rank writes OUT_DIR/rank{r}.pt; the test compares against plain torch.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from fdpg_scale.distributed import checkpoint, engines, generation  # noqa: E402
from fdpg_scale.distributed.launch import all_gather_rows, all_reduce_floats, init_distributed  # noqa: E402
from tests.distributed.common import (ADAM_EPS, GLOBAL_BATCH, LR, TRAIN_STEPS, WARMUP, WEIGHT_DECAY,  # noqa: E402
                                  batch, ds_config, gathered_state_dict, rows, weighted_loss)

out_dir, gpt2_dir, llama_dir = map(Path, sys.argv[1:4])
info = init_distributed()
rank, world = info.rank, info.world_size
res: dict = {"world": world}
res["gathered_rows"] = all_gather_rows({"x": torch.full((rank + 1, 2), float(rank)), "i": torch.arange(rank + 1)})
res["reduced"] = [all_reduce_floats([rank + 1.0, -rank], op=op).tolist() for op in ("sum", "mean", "max", "min")]


def my_rows(b, micro, micro_index):
    start = (micro_index * world + rank) * micro
    return rows(b, start, start + micro)


# 1. Fused head under ZeRO-3: full gradients of one backward, both architectures (one micro-batch per rank).
for arch, d in (("gpt2", gpt2_dir), ("llama", llama_dir)):
    micro = GLOBAL_BATCH // world
    eng = engines.build_policy(d, ds_config(world, micro, 1), lr=LR)
    vocab = eng.module.hf_model.config.vocab_size
    b = my_rows(batch(0, vocab), micro, 0)
    lp = engines.sequence_logprobs(eng, b["input_ids"], b["attention_mask"], b["loss_mask"], temperature=0.7)
    eng.backward(weighted_loss(lp, b["weights"]))
    res[f"grads_{arch}"] = {n: safe_get_full_grad(p).clone() for n, p in eng.module.hf_model.named_parameters()}
    res[f"shards_{arch}"] = {n: (p.ds_numel, p.ds_tensor.numel()) for n, p in eng.module.hf_model.named_parameters()}
    res[f"logprobs_{arch}"] = lp.detach().clone()
    eng.optimizer.zero_grad()
    del eng

# 1b. Gradient checkpointing (train.gradient_checkpointing): the same gradients as section 1's gpt2, and each
# block's forward runs twice (forward, then the recomputation in the backward). transformers checkpoints the
# block's forward, not its __call__ (module hooks stay outside), so the count is taken on a module inside it.
micro = GLOBAL_BATCH // world
eng = engines.build_policy(gpt2_dir, ds_config(world, micro, 1), lr=LR, gradient_checkpointing=True)
block_calls = []
eng.module.hf_model.transformer.h[0].attn.register_forward_hook(lambda *args: block_calls.append(1))
b = my_rows(batch(0, eng.module.hf_model.config.vocab_size), micro, 0)
lp = engines.sequence_logprobs(eng, b["input_ids"], b["attention_mask"], b["loss_mask"], temperature=0.7)
res["block0_forwards_before_backward"] = len(block_calls)
eng.backward(weighted_loss(lp, b["weights"]))
res["block0_forwards_checkpointed"] = len(block_calls)
res["grads_gpt2_checkpointed"] = {n: safe_get_full_grad(p).clone() for n, p in eng.module.hf_model.named_parameters()}
eng.optimizer.zero_grad()
del eng

# 2. Training with accumulation: TRAIN_STEPS optimizer steps, 2 micro-batches per step per rank.
acc = 2
micro = GLOBAL_BATCH // (world * acc)
cfg = ds_config(world, micro, acc)
policy = engines.build_policy(gpt2_dir, cfg, lr=LR, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS,
                              warmup_steps=WARMUP)
proposal = engines.build_frozen(gpt2_dir, cfg)
vocab = policy.module.hf_model.config.vocab_size


def train(steps):
    losses, flags = [], []
    for step in steps:
        b = batch(step, vocab)
        total = 0.0
        for m in range(acc):
            mb = my_rows(b, micro, m)
            lp = engines.sequence_logprobs(policy, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
            loss = weighted_loss(lp, mb["weights"])
            flags.append(engines.train_step(policy, loss))
            total += loss.item() / acc
        losses.append(all_reduce_floats([total], op="mean").item())
    return losses, flags


res["losses"], res["boundaries"] = train(range(TRAIN_STEPS))
res["params"] = gathered_state_dict(policy)
res["lr"] = policy.get_lr()

# 3. q ← π: shard copy, then compare gathered weights and scores.
before = gathered_state_dict(proposal)
engines.copy_policy_into_proposal(policy, proposal)
res["proposal_before"] = before
res["proposal_after"] = gathered_state_dict(proposal)
b = my_rows(batch(99, vocab), 2, 0)
with torch.no_grad():
    res["score_policy"] = engines.sequence_logprobs(policy, b["input_ids"], b["attention_mask"], b["loss_mask"])
res["score_proposal"] = engines.sequence_logprobs(proposal, b["input_ids"], b["attention_mask"], b["loss_mask"])

# 4. Sampling from the proposal: modes agree, log q matches the warped distribution.
bos, eos, pad = 0, 1, 2
prompts = [[], [], [5, 6, 7], [9]]
gen = {}
for name, s in {"t07": generation.SamplingSettings(temperature=0.7, max_new_tokens=10),
                "k1": generation.SamplingSettings(top_k=1, max_new_tokens=6),
                "k5": generation.SamplingSettings(temperature=0.8, top_k=5, max_new_tokens=6),
                "p09": generation.SamplingSettings(top_p=0.9, max_new_tokens=6)}.items():
    for mode in ("gathered", "sharded"):
        r = generation.sample(proposal, prompts, s, seed=7, bos_id=bos, eos_id=eos, pad_id=pad, mode=mode)
        gen[f"{name}_{mode}"] = r
    r = gen[f"{name}_gathered"]
    # Log-probs of the same tokens recomputed by the fused head at temperature T (no truncation) and the full
    # logits for checking the truncated ones.
    gen[f"{name}_rescored"] = engines.sequence_logprobs(proposal, r.input_ids, r.attention_mask, r.gen_mask,
                                                        temperature=s.temperature)
    with torch.no_grad():
        gen[f"{name}_logits"] = proposal.module.hf_model(
            input_ids=r.input_ids, attention_mask=r.attention_mask,
            position_ids=engines.position_ids_from_mask(r.attention_mask)).logits.float()
gen["again"] = generation.sample(proposal, prompts, generation.SamplingSettings(temperature=0.7, max_new_tokens=10),
                                 seed=7, bos_id=bos, eos_id=eos, pad_id=pad)
gen["other_seed"] = generation.sample(proposal, prompts, generation.SamplingSettings(temperature=0.7,
                                      max_new_tokens=10), seed=8, bos_id=bos, eos_id=eos, pad_id=pad)
# Several batches in one rollout (one gather) draw what separate calls with the same seeds draw.
s = generation.SamplingSettings(temperature=0.7, max_new_tokens=10)
gen["batches"] = generation.sample_batches(proposal, [prompts, prompts[:2]], s, seeds=[7, 9], bos_id=bos, eos_id=eos,
                                           pad_id=pad)
gen["batch2_alone"] = generation.sample(proposal, prompts[:2], s, seed=9, bos_id=bos, eos_id=eos, pad_id=pad)

# 4b. The trainer's rollout (training/rollout.py): sampling chunks of sampling.batch = 4 sequences, scored in
# micro-batches of 2; log q rescored by the fused head (temperature only) or kept as recorded (top-k). The
# global batch of 8 is gathered so that the test can compare 1 and 2 ranks.
from transformers import AutoTokenizer  # noqa: E402

from fdpg_scale.targets.tasks import build_task  # noqa: E402
from fdpg_scale.training.config import TargetConfig  # noqa: E402
from fdpg_scale.training.rollout import RolloutPlan, collect_chunks, logq_mismatch_metrics  # noqa: E402
from fdpg_scale.training.timing import PhaseTimer  # noqa: E402

tok = AutoTokenizer.from_pretrained(gpt2_dir)
task = build_task(TargetConfig(scorer_args={"substring": "e"}), tok)
res["rollout"] = {}
for name, s in {"t07": generation.SamplingSettings(temperature=0.7, max_new_tokens=8),
                "k5": generation.SamplingSettings(top_k=5, max_new_tokens=8)}.items():
    plan = RolloutPlan(settings=s, mode="gathered", run_seed=3, rank=rank, world=world, accumulation=4 // world,
                       micro_batch=2, sampling_batch=4)
    chunks = collect_chunks(sampler=proposal, base=proposal, task=task, tokenizer=tok, plan=plan, step=1,
                            timer=PhaseTimer())
    gathered = all_gather_rows({"ids": torch.cat([c.rollout.input_ids for c in chunks]),
                                "logq": torch.cat([c.logq for c in chunks]),
                                "logq_recorded": torch.cat([c.logq_recorded for c in chunks]),
                                "token_logq": torch.cat([c.rollout.logprobs for c in chunks])})
    res["rollout"][name] = {"sizes": [c.rollout.input_ids.shape[0] for c in chunks], "rows": gathered,
                            "metrics": logq_mismatch_metrics(gathered["logq_recorded"] - gathered["logq"])}

# On-policy sampling from the trainable engine; afterwards the ZeRO hooks must be back and the weights
# partitioned again (the training below depends on it).
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402

offload = policy.optimizer.parameter_offload
res["hooks_before"] = (len(offload.forward_hooks), len(offload.backward_hooks))
s = generation.SamplingSettings(temperature=0.9, max_new_tokens=6)
for mode in ("gathered", "sharded"):
    gen[f"policy_{mode}"] = generation.sample(policy, prompts, s, seed=3, bos_id=bos, eos_id=eos, pad_id=pad, mode=mode)
res["hooks_after"] = (len(offload.forward_hooks), len(offload.backward_hooks))
res["partitioned_after"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in policy.module.parameters())
res["gen"] = gen

# 5. Checkpoint: save, train on, load, train on again: same losses (optimizer + scheduler restored).
fp = {"model": checkpoint.model_config_hash(gpt2_dir), "divergence": "js", "alpha": None}
state = {"step": TRAIN_STEPS, "log_z": torch.tensor(-1.25, dtype=torch.float64), "baseline": 0.5,
         "proposal_version": 3}
ck = checkpoint.save_checkpoint(out_dir / "run", TRAIN_STEPS, policy=policy, proposal=proposal,
                                trainer_state=state, fingerprint=fp, keep=2)
res["saved_params"] = gathered_state_dict(policy)
res["rand_after_save"] = torch.rand(3)
res["cont_losses"], _ = train(range(TRAIN_STEPS, TRAIN_STEPS + 2))
with torch.no_grad():  # disturb the proposal so that loading it is visible
    for p in proposal.module.parameters():
        p.ds_tensor.add_(1.0)
loaded = checkpoint.load_checkpoint(checkpoint.find_latest(out_dir / "run"), policy=policy, proposal=proposal,
                                    fingerprint=fp)
res["rand_after_load"] = torch.rand(3)
res["loaded_state"] = loaded
res["loaded_proposal"] = gathered_state_dict(proposal)
res["resumed_losses"], _ = train(range(TRAIN_STEPS, TRAIN_STEPS + 2))
res["ckpt"] = str(ck)

torch.save(res, out_dir / f"rank{rank}.pt")
