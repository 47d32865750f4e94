"""ZeroBackend (training/backend.py) on a tiny GPT-2 in this one process (a world of 1, gloo): what fdpg_step
asks of it. Sampling follows the RolloutPlan (same step: same draws; another step: others), log π carries the
gradient, and DeepSpeed steps at the accumulation boundary, which ``optimizer_step`` checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdpg_scale.training.config import load_config
from fdpg_scale.training.rollout import RolloutPlan
from tests.harness import one_rank_zero3

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A ZeroBackend over policy, proposal and base engines built as the trainer builds them (off-policy)."""
    from transformers import AutoTokenizer

    from fdpg_scale.distributed.engines import build_frozen, build_policy
    from fdpg_scale.models.tiny import build_tiny_model_dir
    from fdpg_scale.targets.tasks import build_task
    from fdpg_scale.training.backend import ZeroBackend
    from fdpg_scale.training.run_setup import deepspeed_config

    tmp = tmp_path_factory.mktemp("backend")
    model_dir = build_tiny_model_dir(tmp / "tiny-gpt2")
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"model.path={model_dir}", f"output_dir={tmp / 'run'}",
                                                    "train.global_batch=4", "train.micro_batch=2",
                                                    "sampling.max_new_tokens=6", "sampling.temperature=0.8"])
    with one_rank_zero3():
        plan = RolloutPlan.from_config(cfg, rank=0, world=1)
        ds = deepspeed_config(cfg, world_size=1, accumulation=plan.accumulation)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        yield ZeroBackend(policy=build_policy(model_dir, ds, lr=1e-3), proposal=build_frozen(model_dir, ds),
                          base=build_frozen(model_dir, ds), task=build_task(cfg.target, tokenizer),
                          tokenizer=tokenizer, plan=plan)


def test_sample_draws_the_plans_micro_batches_reproducibly(backend):
    draws = backend.sample(step=0)
    assert len(draws) == backend.plan.accumulation == 2
    for d in draws:
        ids = d.payload.rollout.input_ids
        assert ids.shape[0] == backend.plan.micro_batch and d.logq.shape == d.log_target.shape == (2,)
        assert bool(torch.isfinite(d.logq).all()) and bool((d.logq < 0).all())
    again, other = backend.sample(step=0), backend.sample(step=1)
    assert all(torch.equal(a.payload.rollout.input_ids, b.payload.rollout.input_ids) for a, b in zip(draws, again))
    assert not all(torch.equal(a.payload.rollout.input_ids, b.payload.rollout.input_ids)
                   for a, b in zip(draws, other))
    assert set(backend.timer.seconds) >= {"generation", "scoring"}


def test_logprobs_backward_and_the_accumulation_boundary(backend):
    draws = backend.sample(step=2)
    before = [p.ds_tensor.clone() for p in backend.policy.module.parameters()]
    for i, d in enumerate(draws):
        logp = backend.policy_logprobs(d)
        assert logp.shape == (2,) and logp.requires_grad
        # At T = 0.8 the warped π is another pass, without gradient, and differs from log π.
        warped = backend.sampling_logprobs(d, logp)
        assert not warped.requires_grad and not torch.allclose(warped, logp.detach())
        if i < len(draws) - 1:
            with pytest.raises(RuntimeError, match="accumulation boundary"):
                backend.optimizer_step()              # not yet: DeepSpeed steps in the last backward
        backend.backward(-logp.mean())
    backend.optimizer_step()
    after = [p.ds_tensor for p in backend.policy.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))   # the policy moved


def test_backend_needs_a_plan_and_a_q_version_for_vllm(backend):
    from fdpg_scale.training.backend import ZeroBackend

    parts = dict(policy=backend.policy, proposal=backend.proposal, base=backend.base, task=backend.task,
                 tokenizer=backend.tokenizer)
    with pytest.raises(TypeError, match="plan must be a RolloutPlan, got dict"):
        ZeroBackend(**parts, plan={"micro_batch": 2})
    with pytest.raises(ValueError, match="needs q_version"):
        ZeroBackend(**parts, plan=backend.plan, vllm=object())


def test_evidence_rows_rescore_to_the_warped_policy_log_probs(backend):
    """The proposal check's evidence: rows of one width for every micro-batch, and ``rescore_sampling`` on them
    gives what ``sampling_logprobs`` gives on the rollouts themselves (left-padding changes no log-prob)."""
    draws = backend.sample(step=3)
    rows = [backend.evidence_rows(d) for d in draws]
    width = backend.evidence_width
    assert all(r["input_ids"].shape == (2, width) and r["gen_mask"].dtype == torch.bool for r in rows)
    merged = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        direct = torch.cat([backend.sampling_logprobs(d, backend.policy_logprobs(d).detach()) for d in draws])
    rescored = backend.rescore_sampling(merged)
    assert rescored.shape == (4,)
    assert torch.allclose(rescored, direct.cpu(), rtol=1e-5, atol=1e-5), (rescored, direct)


def test_skipping_the_log_q_rescoring_in_fp32_on_cpu_keeps_every_value(backend, monkeypatch):
    """``recorded_logq_exact`` (fp32 weights on the CPU) skips the proposal's rescoring forward: the same seeds
    draw the same tokens, and the recorded log q equals the rescored one within the fp32 tolerance."""
    import dataclasses

    plan = backend.plan
    assert plan.recorded_logq_exact          # from_config: fp32 on the CPU
    from fdpg_scale.training import rollout

    scored = []          # the engine of each scoring forward
    real = rollout.sequence_logprobs
    monkeypatch.setattr(rollout, "sequence_logprobs",
                        lambda engine, *a, **k: scored.append(engine) or real(engine, *a, **k))
    try:
        backend.plan = dataclasses.replace(plan, recorded_logq_exact=False)
        rescored = backend.sample(step=4)
        backend.plan = dataclasses.replace(plan, recorded_logq_exact=True)
        forwards_rescored = list(scored)
        recorded = backend.sample(step=4)
    finally:
        backend.plan = plan
    for a, b in zip(rescored, recorded):
        assert torch.equal(a.payload.rollout.input_ids, b.payload.rollout.input_ids)
        assert torch.equal(a.log_target, b.log_target) and torch.equal(a.log_base, b.log_base)
        assert torch.allclose(a.logq, b.logq, rtol=0, atol=1e-5), (a.logq, b.logq)
        assert torch.equal(b.extras["logq_mismatch"], torch.zeros(2))   # nothing was rescored
    assert forwards_rescored == [backend.base, backend.proposal] * 2   # a and q per micro-batch
    assert scored[4:] == [backend.base] * 2                            # a alone


def test_inference_copies_sample_and_score_as_the_engines(backend):
    """``train.inference_copies``: a whole copy of q draws the same tokens with the same log q for the same seed
    as q's ZeRO-3 engine, a copy of a scores as a's engine, and q's copy follows q ← π on ``refresh``."""
    import dataclasses

    from fdpg_scale.distributed.engines import sequence_logprobs
    from fdpg_scale.distributed.generation import sample_batches
    from fdpg_scale.distributed.inference_copy import InferenceCopy

    with pytest.raises(ValueError, match="of a frozen engine"):
        InferenceCopy(backend.policy)
    q_copy, a_copy = InferenceCopy(backend.proposal), InferenceCopy(backend.base)
    settings = dataclasses.replace(backend.plan.settings, top_k=5)   # the warpers too
    kw = dict(seeds=[3, 4], bos_id=0, eos_id=backend.tokenizer.eos_token_id, pad_id=0)
    prompts = [[[]] * 3, [[5, 6], [7], []]]                          # BOS-only and left-padded prompts
    for mode in ("gathered", "sharded"):
        ours = sample_batches(q_copy, prompts, settings, mode=mode, **kw)
        theirs = sample_batches(backend.proposal, prompts, settings, mode=mode, **kw)
        for a, b in zip(ours, theirs):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.gen_mask, b.gen_mask)
            assert torch.allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
    r = theirs[1]
    with torch.no_grad():
        for copy, engine in ((a_copy, backend.base), (q_copy, backend.proposal)):
            assert torch.allclose(sequence_logprobs(copy, r.input_ids, r.attention_mask, r.gen_mask, temperature=0.8),
                                  sequence_logprobs(engine, r.input_ids, r.attention_mask, r.gen_mask,
                                                    temperature=0.8), rtol=0, atol=1e-6)
    for d in backend.sample(step=5):   # π moves away from q
        backend.backward(-backend.policy_logprobs(d).mean())
    backend.optimizer_step()
    backend.replace_proposal()   # the proposal engine only: the backend holds no copy
    stale = sequence_logprobs(q_copy, r.input_ids, r.attention_mask, r.gen_mask)
    q_copy.refresh()
    with torch.no_grad():
        fresh, pi = (sequence_logprobs(e, r.input_ids, r.attention_mask, r.gen_mask) for e in (q_copy, backend.policy))
    assert torch.allclose(fresh, pi, rtol=0, atol=1e-6) and not torch.allclose(stale, fresh)
