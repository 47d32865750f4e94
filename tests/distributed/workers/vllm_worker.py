"""Worker for tests/distributed/test_vllm_engine.py: every check of the vLLM proposal engine in one run (one rank),
so the engine (about a minute to start on 2 CPU cores) starts once. Everything runs under ``main()``: vLLM
starts its engine process with multiprocessing's "spawn", which re-imports this file.

argv: OUT_DIR MODEL_DIR. Writes OUT_DIR/results.pt; the test checks one property of it per test.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from fdpg_scale.distributed import engines  # noqa: E402
from fdpg_scale.distributed.generation import SamplingSettings  # noqa: E402
from fdpg_scale.distributed.launch import init_distributed  # noqa: E402
from fdpg_scale.distributed.vllm_engine import VllmEngineSettings, VllmProposal  # noqa: E402
from fdpg_scale.targets.tasks import build_task  # noqa: E402
from fdpg_scale.training.config import TargetConfig  # noqa: E402
from fdpg_scale.training.rollout import RolloutPlan, collect_chunks  # noqa: E402
from fdpg_scale.training.timing import PhaseTimer  # noqa: E402
from tests.distributed.common import batch, ds_config, gathered_state_dict, weighted_loss  # noqa: E402


def main():
    out_dir, model_dir = map(Path, sys.argv[1:3])
    init_distributed()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = dict(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    micro = 4
    cfg = ds_config(1, micro, 1)
    policy = engines.build_policy(model_dir, cfg, lr=5e-2)
    proposal = engines.build_frozen(model_dir, cfg)
    base = engines.build_frozen(model_dir, cfg)
    engine = VllmProposal(model_dir, VllmEngineSettings(kv_cache_bytes=64 * 2**20), seed=0)
    res: dict = {"start_seconds": engine.start_seconds}
    T = 0.7
    hot = SamplingSettings(temperature=T, max_new_tokens=12)
    prompts = [[]] * 4 + [tok.encode("def"), tok.encode("import os"), tok.encode("x"), tok.encode("class A:")]

    def draw_and_score(settings: SamplingSettings, seed: int) -> dict:
        """A vLLM draw and the policy's fused log-probs of the same tokens at the same temperature."""
        r = engine.sample(prompts, settings, seed=seed, **ids)
        with torch.no_grad():
            lp_pi = engines.sequence_logprobs(policy, r.input_ids, r.attention_mask, r.gen_mask,
                                              temperature=settings.temperature).cpu()
        return {"rollout": r, "logp_pi": lp_pi}

    # 1. Refresh: the engine serves the model directory's weights; π then takes optimizer steps, q ← π
    #    (copy_policy_into_proposal, as the trainer does), and the engine is refreshed from the ZeRO-3 proposal.
    res["push_seconds"] = [engine.refresh_from(proposal, version=0)]
    res["initial"] = draw_and_score(hot, seed=1)
    vocab = policy.module.hf_model.config.vocab_size
    for step in range(3):
        b = batch(step, vocab, n=micro)
        lp = engines.sequence_logprobs(policy, b["input_ids"], b["attention_mask"], b["loss_mask"])
        engines.train_step(policy, weighted_loss(lp, b["weights"]))
    res["stale"] = draw_and_score(hot, seed=2)          # engine still holds the old q: must NOT match π
    engines.copy_policy_into_proposal(policy, proposal)
    res["push_seconds"].append(engine.refresh_from(proposal, version=1))
    res["refreshed"] = draw_and_score(hot, seed=2)
    res["refreshed_again"] = engine.sample(prompts, hot, seed=2, **ids)  # same seed, same weights: same draw

    # 2. The tied-head trap: a push without lm_head.weight (GPT-2's head IS wte) leaves vLLM's head stale.
    full = gathered_state_dict(proposal)  # HF names; the tied head listed once (transformer.wte.weight)
    res["named_params"] = sorted(n for n, _ in proposal.module.hf_model.named_parameters(remove_duplicate=False))
    scaled = {n: (t * 1.5 if n.endswith("wte.weight") else t) for n, t in full.items()}
    engine.load_weights(scaled.items(), version="no-head")
    res["headless"] = engine.sample(prompts, hot, seed=3, **ids)
    engine.refresh_from(proposal, version=1)

    # 3. top-k / top-p pass through: the test recomputes log q from the plain model with these weights.
    res["weights"] = full
    for name, s in (("top_k", SamplingSettings(temperature=T, top_k=5, max_new_tokens=12)),
                    ("top_p", SamplingSettings(temperature=T, top_p=0.8, max_new_tokens=12))):
        res[name] = engine.sample(prompts, s, seed=4, **ids)

    # 4. Seeds: chunk c of a step is the same draw whatever the world size and the order the chunks are drawn in
    #    (1 rank: chunks 0,1,2,3 in a row; 2 ranks: rank 0 draws 0 then 2, rank 1 draws 1 then 3).
    task = build_task(TargetConfig(kind="pointwise", scorer="contains", scorer_args={"substring": "e"}), tok)
    common = dict(sampler=engine, q_engine=proposal, base=base, task=task, tokenizer=tok, step=5, timer=PhaseTimer())

    def plan(rank, world, accumulation):
        return RolloutPlan(settings=hot, mode="gathered", run_seed=7, rank=rank, world=world,
                           accumulation=accumulation, micro_batch=micro)

    res["chunks_world1"] = [c.rollout for c in collect_chunks(**common, plan=plan(0, 1, 4))]
    res["chunks_world2"] = {rank: [c.rollout for c in collect_chunks(**common, plan=plan(rank, 2, 2))]
                            for rank in (1, 0)}
    engine.close()
    torch.save(res, out_dir / "results.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
