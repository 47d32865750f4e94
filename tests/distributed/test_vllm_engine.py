"""The vLLM proposal engine (sampling.engine: vllm): log q, weight refresh from ZeRO-3, seeds, and a 2-rank run.

One worker run (workers/vllm_worker.py, one torchrun rank) starts one engine and produces every result the
first tests check; the last test trains 2 ranks × 2 steps with ``sampling.engine=vllm`` as a user would.
Skipped only where vLLM cannot be imported (the ``vllm`` extra: scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fdpg_scale.models.tiny import build_tiny_model_dir
from tests.harness import metrics, run_train, run_workers
from tests.helpers import assert_close, vllm_tiny_gpt2

pytest.importorskip("vllm", reason="the vllm extra is not installed (scripts/setup.sh installs it)")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
# fp32 engine vs fp32 fused head: different kernels and summation orders, same math (measured ≤ 4e-6).
ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vllm_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2-2heads")


@pytest.fixture(scope="module")
def res(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    run_workers("vllm_worker.py", 1, str(root), str(model), timeout=900)
    return torch.load(root / "results.pt", weights_only=False)


def test_head_size_without_cpu_kernel_is_refused_by_name(tmp_path):
    """The embedded tiny GPT-2 (4 heads of 16) is refused before the engine's minute-long start."""
    from fdpg_scale.distributed.vllm_engine import VllmEngineSettings, VllmProposal

    model = build_tiny_model_dir(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match="head size 16"):
        VllmProposal(model, VllmEngineSettings(kv_cache_bytes=2**20))


def _check_matches(draw, name):
    r = draw["rollout"]
    assert r.gen_mask.any(), f"{name}: nothing generated"
    assert_close(r.logprobs, draw["logp_pi"] * r.gen_mask, rtol=0, atol=ATOL, name=f"{name}: log q vs log π")


def test_processed_logprobs_are_log_q_at_temperature(res):
    """Before training π = q: the engine's log-probs are log softmax(logits / T) of the fused head."""
    _check_matches(res["initial"], "initial")


def test_refresh_after_replacement_matches_policy(res):
    """After π's optimizer steps and q ← π, the refreshed engine's log-probs equal π's fused log-probs;
    the engine still holding the old q does not (so the refresh, not luck, makes them equal)."""
    stale = res["stale"]
    gap = (stale["rollout"].logprobs - stale["logp_pi"] * stale["rollout"].gen_mask).abs().max()
    assert gap > 100 * ATOL, f"π's updates did not move the log-probs ({gap:.2e}): the check below would be vacuous"
    _check_matches(res["refreshed"], "refreshed")
    assert max(res["push_seconds"]) < 30, res["push_seconds"]


def test_same_seed_same_draw(res):
    a, b = res["refreshed"]["rollout"], res["refreshed_again"]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)


def test_tied_head_is_sent_under_its_own_name(res):
    """GPT-2's lm_head IS wte: refresh_from sends it as lm_head.weight too; a push without it (load_weights
    with only HF's deduplicated names) leaves vLLM's head on the old weights, which the draw shows."""
    assert "lm_head.weight" in res["named_params"] and "transformer.wte.weight" in res["named_params"]
    headless, ref = res["headless"], res["refreshed"]["rollout"]
    assert headless.gen_mask.any()
    # wte scaled by 1.5 without the head: the draw uses new embeddings but the old head, a model that is
    # neither q nor the scaled one; its log-probs differ from q's at once (first generated token).
    assert not torch.equal(headless.logprobs, ref.logprobs)


@pytest.mark.parametrize("which", ["top_k", "top_p"])
def test_truncation_passes_through(res, model, which):
    """top-k / top-p: log q is the log-prob under the truncated, renormalised distribution (as the hf path's
    warpers give it), computed here from the plain model's logits / T with the engine's weights."""
    from transformers import AutoModelForCausalLM

    from fdpg_scale.distributed.engines import position_ids_from_mask

    r = res[which]
    plain = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    missing, unexpected = plain.load_state_dict(res["weights"], strict=False)  # the tied head follows wte
    assert not unexpected and all(n == "lm_head.weight" for n in missing), (missing, unexpected)
    with torch.no_grad():
        logits = plain(input_ids=r.input_ids, attention_mask=r.attention_mask,
                       position_ids=position_ids_from_mask(r.attention_mask)).logits.float()[:, :-1] / 0.7
    assert r.gen_mask.any()
    if which == "top_k":
        kth = logits.topk(5, dim=-1).values[..., -1:]
        keep = logits >= kth
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (a token is kept if the mass before it is < p)
        keep_sorted = (probs.cumsum(-1) - probs) < 0.8
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    ref = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1)
    ref = ref.gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    ref = torch.nn.functional.pad(ref, (1, 0)).masked_fill(~r.gen_mask, 0.0)
    assert_close(r.logprobs, ref, rtol=0, atol=ATOL, name=f"{which} log q")
    untruncated = torch.log_softmax(logits, -1).gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    untruncated = torch.nn.functional.pad(untruncated, (1, 0)).masked_fill(~r.gen_mask, 0.0)
    assert (r.logprobs - untruncated).max() > 1e-3, "truncation did not change log q: the check is vacuous"


def test_chunks_independent_of_world_size_and_order(res):
    """Chunk c = micro·world + rank: 1 rank (chunks 0-3 in a row) and 2 ranks (rank 1 first, each drawing two
    chunks) draw the same four chunks, and different chunks differ."""
    one = res["chunks_world1"]
    two = res["chunks_world2"]
    by_chunk = {micro * 2 + rank: two[rank][micro] for rank in (0, 1) for micro in (0, 1)}
    for c in range(4):
        assert torch.equal(one[c].input_ids, by_chunk[c].input_ids), f"chunk {c} differs between world sizes"
        assert torch.equal(one[c].logprobs, by_chunk[c].logprobs)
    assert not torch.equal(one[0].input_ids, one[1].input_ids)


def test_train_two_ranks_vllm_engine(tmp_path, model):
    """`fdpg-scale train` on 2 gloo ranks × 2 steps with sampling.engine=vllm (one engine per rank): it trains,
    and the first step pushes q's starting weights into the engines (a "refresh" phase in its timings)."""
    out = tmp_path / "run"
    text = run_train(out, "model.build=null", "sampling.engine=vllm", "sampling.vllm.kv_cache_mib=64",
                     "train.steps=2", "train.save_every=2", nproc=2, model=model)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2], text[-3000:]
    assert all(r["tokens"] > 0 and math.isfinite(r["loss"]) and math.isfinite(r["alignment"]) for r in rows)
    assert rows[0]["time/refresh"] > 0
    # the second step pushes again only if q was replaced after the first
    assert ("time/refresh" in rows[1]) == bool(rows[0]["proposal_replaced"]), rows
