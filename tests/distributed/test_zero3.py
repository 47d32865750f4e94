"""ZeRO-3 on 1 and 2 ranks against plain single-process torch (and against each other): fused head gradients,
training with accumulation, q ← π, sampling, checkpoint resume and export. One worker run per world size
(workers/zero3_worker.py) produces everything; each test checks one property of its results."""

from __future__ import annotations

import math

import pytest
import torch

from fdpg_scale.distributed import checkpoint, engines
from fdpg_scale.distributed.export import export_latest
from fdpg_scale.models.tiny import build_tiny_model_dir
from tests.distributed.common import (ADAM_EPS, GLOBAL_BATCH, GRAD_CLIP, LR, TRAIN_STEPS, WARMUP, WEIGHT_DECAY, batch,
                                  weighted_loss)
from tests.harness import run_workers
from tests.helpers import assert_close

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORLDS = (1, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": build_tiny_model_dir(root / "gpt2", "gpt2"), "llama": build_tiny_model_dir(root / "llama", "llama")}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """world size -> {"out": the worker's directory, "ranks": [each rank's results]}."""
    result = {}
    for world in WORLDS:
        out = tmp_path_factory.mktemp(f"zero3_{world}ranks")
        run_workers("zero3_worker.py", world, str(out), str(models["gpt2"]), str(models["llama"]))
        result[world] = {"out": out, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=False)
                                               for r in range(world)]}
    return result


@pytest.fixture(scope="module")
def run(runs):
    return runs[2]


def _plain(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return m.eval()


def _naive_logprobs(model, b, temperature=1.0):
    """The naive head: full logits → log_softmax → gather, aligned like sequence_logprobs."""
    ids, mask = b["input_ids"], b["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=engines.position_ids_from_mask(mask)).logits
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp = lp * b["loss_mask"][:, 1:]
    return torch.nn.functional.pad(lp, (1, 0))


def _close_rel(actual, expected, name, rel=1e-5):
    scale = expected.abs().max().item()
    assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12), name=name)


def test_collectives(runs):
    for res in runs[2]["ranks"]:
        assert res["gathered_rows"]["x"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert res["gathered_rows"]["i"].tolist() == [0, 0, 1] and res["gathered_rows"]["i"].dtype == torch.long
        assert res["reduced"] == [[3.0, -1.0], [1.5, -0.5], [2.0, 0.0], [1.0, -1.0]]
    one = runs[1]["ranks"][0]
    assert one["gathered_rows"]["x"].tolist() == [[0.0, 0.0]] and one["reduced"][0] == [1.0, 0.0]


def test_each_rank_holds_its_fraction_of_every_parameter(runs):
    for world, run in runs.items():
        for arch in ("gpt2", "llama"):
            for r, res in enumerate(run["ranks"]):
                for name, (full, local) in res[f"shards_{arch}"].items():
                    assert local == math.ceil(full / world), f"{world} ranks {arch} rank {r} {name}: {local}/{full}"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_head_gradients_match_naive_head(runs, models, arch):
    model = _plain(models[arch])
    b = batch(0, model.config.vocab_size)
    lp = _naive_logprobs(model, b, temperature=0.7)
    weighted_loss(lp, b["weights"]).backward()
    for world, run in runs.items():
        part = GLOBAL_BATCH // world
        for r, res in enumerate(run["ranks"]):
            where = f"{arch}, rank {r} of {world}"
            _close_rel(res[f"logprobs_{arch}"], lp.detach()[r * part:(r + 1) * part], f"logprobs {where}")
            grads = res[f"grads_{arch}"]
            assert set(grads) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                _close_rel(grads[name], p.grad, f"grad {name} {where}")


def test_training_with_accumulation_matches_single_process(runs, models):
    model = _plain(models["gpt2"])
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=LR, eps=ADAM_EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engines._lr_lambda("constant", WARMUP, None))
    losses = []
    for step in range(TRAIN_STEPS):
        b = batch(step, model.config.vocab_size)
        loss = weighted_loss(_naive_logprobs(model, b), b["weights"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        sched.step()
        losses.append(loss.item())
    for world, run in runs.items():
        for r, res in enumerate(run["ranks"]):
            assert res["boundaries"] == [False, True] * TRAIN_STEPS
            assert res["lr"] == [LR] * 2
            _close_rel(torch.tensor(res["losses"]), torch.tensor(losses), f"losses rank {r} of {world}")
            for name, p in model.named_parameters():
                _close_rel(res["params"][name], p.detach(), f"param {name} rank {r} of {world}")


def test_two_ranks_match_one_rank(runs):
    one, two = runs[1]["ranks"][0], runs[2]["ranks"]
    for res in two:
        _close_rel(torch.tensor(res["losses"]), torch.tensor(one["losses"]), "losses 2 ranks vs 1")
        for name, p in one["params"].items():
            _close_rel(res["params"][name], p, f"param {name} 2 ranks vs 1")


def test_copy_policy_into_proposal(run):
    for r, res in enumerate(run["ranks"]):
        moved = [n for n in res["params"] if not torch.equal(res["proposal_before"][n], res["params"][n])]
        assert moved, "training should have changed the policy away from the proposal"
        for n, p in res["params"].items():
            assert torch.equal(res["proposal_after"][n], p), f"{n} rank {r}"
        assert torch.equal(res["score_proposal"], res["score_policy"])


def test_sampling_modes_agree_and_the_seed_alone_determines_the_draw(run):
    r0, r1 = (res["gen"] for res in run["ranks"])
    for g in (r0, r1):
        for name in ("t07", "k1", "k5", "p09"):
            a, b = g[f"{name}_gathered"], g[f"{name}_sharded"]
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.gen_mask, b.gen_mask), name
            assert_close(a.logprobs, b.logprobs, rtol=1e-6, atol=1e-6, name=name)
        assert torch.equal(g["again"].input_ids, g["t07_gathered"].input_ids)  # same seed: same draw
        assert not torch.equal(g["other_seed"].input_ids, g["t07_gathered"].input_ids)
    # The draw depends on the seed, not on the rank: the trainer relies on it to draw the same global batch
    # whatever the world size (it gives each chunk its own seed).
    assert torch.equal(r0["t07_gathered"].input_ids, r1["t07_gathered"].input_ids)


def test_several_batches_in_one_rollout_draw_as_separate_calls(run):
    for res in run["ranks"]:
        g = res["gen"]
        first, second = g["batches"]
        assert torch.equal(first.input_ids, g["t07_gathered"].input_ids)  # seed 7, the same prompts
        assert torch.equal(second.input_ids, g["batch2_alone"].input_ids)
        assert torch.equal(second.logprobs, g["batch2_alone"].logprobs)


def test_rollout_draws_the_same_global_batch_on_1_and_2_ranks(runs):
    """sampling.batch = 4, micro_batch = 2: one rank samples chunks 0 and 1, two ranks one each; the global
    batch (as a set of sequences) is the same, and it is scored in micro-batches of 2."""
    def as_set(rows):
        return sorted(map(tuple, rows["ids"].tolist()))

    for name in ("t07", "k5"):
        one, two = (runs[w]["ranks"][0]["rollout"][name] for w in (1, 2))
        assert one["sizes"] == [2, 2, 2, 2] and two["sizes"] == [2, 2]
        assert len(one["rows"]["ids"]) == len(two["rows"]["ids"]) == 8
        assert as_set(one["rows"]) == as_set(two["rows"]), name
        assert len(set(as_set(one["rows"]))) > 1  # the chunks drew different sequences


def test_rollout_rescores_logq_with_the_fused_head(runs):
    """Temperature only: log q is rescored, and on CPU in fp32 it agrees with what generate recorded within
    1e-5 (the mismatch metric says so); top-k: the recorded, truncated log q is kept as is."""
    # Really recomputed, not copied: the two differ in the last bits somewhere (on this CPU with 1 rank, whose
    # batch shapes make the two matmuls round differently; with 2 ranks they happen to agree bit for bit).
    assert any(not torch.equal(res["rollout"]["t07"]["rows"]["logq"], res["rollout"]["t07"]["rows"]["logq_recorded"])
               for run in runs.values() for res in run["ranks"])
    for world, run in runs.items():
        for res in run["ranks"]:
            t = res["rollout"]["t07"]
            rows = t["rows"]
            assert_close(rows["logq"], rows["logq_recorded"], rtol=0, atol=1e-5, name=f"rescored log q, {world} ranks")
            assert abs(t["metrics"]["logq_mismatch_mean"]) < 1e-5 and t["metrics"]["logq_mismatch_std"] < 1e-5
            assert (rows["token_logq"] <= 0).all()
            k = res["rollout"]["k5"]
            assert torch.equal(k["rows"]["logq"], k["rows"]["logq_recorded"])
            assert k["metrics"] == {"logq_mismatch_mean": 0.0, "logq_mismatch_std": 0.0}


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(runs):
    for world, run in runs.items():
        for r, res in enumerate(run["ranks"]):
            assert res["block0_forwards_before_backward"] == 1 and res["block0_forwards_checkpointed"] == 2
            for n, g in res["grads_gpt2"].items():
                _close_rel(res["grads_gpt2_checkpointed"][n], g, f"checkpointed grad {n}, {world} ranks, rank {r}",
                           rel=1e-5)


def test_on_policy_sampling_restores_zero3_state(runs):
    for world, run in runs.items():
        for res in run["ranks"]:
            a, b = res["gen"]["policy_gathered"], res["gen"]["policy_sharded"]
            assert torch.equal(a.input_ids, b.input_ids)
            assert_close(a.logprobs, b.logprobs, rtol=1e-6, atol=1e-6, name=f"policy samples, {world} ranks")
            assert res["hooks_after"] == res["hooks_before"] and res["partitioned_after"]


def test_rollout_layout(run):
    r = run["ranks"][0]["gen"]["t07_gathered"]
    assert r.prompt_len == 3 and r.input_ids.shape == (4, 3 + 10)
    assert r.input_ids[0, :3].tolist() == [2, 2, 0] and r.input_ids[2, :3].tolist() == [5, 6, 7]  # [] = BOS
    assert r.attention_mask[:, :3].tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1]]
    for row in range(4):
        gen = r.gen_mask[row].nonzero().flatten()
        assert gen[0].item() == 3 and torch.equal(gen, torch.arange(3, 3 + len(gen)))  # contiguous from prompt
        eos = (r.input_ids[row, 3:] == 1).nonzero().flatten()
        if len(eos):  # up to and including the first EOS, nothing after
            assert gen[-1].item() == 3 + eos[0].item()
        assert torch.equal(r.attention_mask[row, 3:].bool(), r.gen_mask[row, 3:])
        assert (r.logprobs[row][~r.gen_mask[row]] == 0).all() and (r.logprobs[row][r.gen_mask[row]] < 0).all()


def _sampled(r, logits):
    """(token, logits predicting it) for every generated position."""
    idx = r.gen_mask.nonzero()
    return idx, r.input_ids[idx[:, 0], idx[:, 1]], logits[idx[:, 0], idx[:, 1] - 1]


def test_sampled_logprobs_are_those_of_the_warped_proposal(run):
    for g in (res["gen"] for res in run["ranks"]):
        # temperature only: exactly the fused head's log softmax(z/T)
        r = g["t07_gathered"]
        _close_rel(r.logprobs, g["t07_rescored"], "T=0.7 log q vs linear_token_logprobs")
        # top_k=1: q is a point mass on the argmax
        r = g["k1_gathered"]
        idx, tok, z = _sampled(r, g["k1_logits"])
        assert torch.equal(tok, z.argmax(-1)) and (r.logprobs[r.gen_mask] == 0).all()
        # top_k=5, T=0.8: log q = z_t/T − logsumexp(top-5 of z/T)
        r = g["k5_gathered"]
        idx, tok, z = _sampled(r, g["k5_logits"])
        s = z / 0.8
        top = s.topk(5, -1).values
        assert (s.gather(1, tok[:, None]).squeeze(1) >= top[:, -1]).all()
        assert_close(r.logprobs[idx[:, 0], idx[:, 1]], s.gather(1, tok[:, None]).squeeze(1) - top.logsumexp(-1),
                     rtol=1e-5, atol=1e-5, name="top-5 log q")
        # top_p=0.9: the smallest set of most likely tokens whose mass reaches 0.9, renormalised
        r = g["p09_gathered"]
        idx, tok, z = _sampled(r, g["p09_logits"])
        p = torch.softmax(z, -1)
        sorted_p, order = p.sort(-1, descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < 0.9
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        assert keep.gather(1, tok[:, None]).all()
        expected = torch.log(p.gather(1, tok[:, None]).squeeze(1) / (p * keep).sum(-1))
        assert_close(r.logprobs[idx[:, 0], idx[:, 1]], expected, rtol=1e-5, atol=1e-5, name="top-p log q")


def test_checkpoint_resume_restores_everything(run):
    for r, res in enumerate(run["ranks"]):
        _close_rel(torch.tensor(res["resumed_losses"]), torch.tensor(res["cont_losses"]), f"resumed losses rank {r}",
                   rel=1e-6)
        assert torch.equal(res["rand_after_load"], res["rand_after_save"])
        st = res["loaded_state"]
        assert st["step"] == TRAIN_STEPS and st["baseline"] == 0.5 and st["proposal_version"] == 3
        assert st["log_z"].item() == -1.25
        for n, p in res["proposal_after"].items():
            assert torch.equal(res["loaded_proposal"][n], p), n


def test_fingerprint_mismatch_is_refused(run, models):
    ck = run["ranks"][0]["ckpt"]
    fp = {"model": checkpoint.model_config_hash(models["gpt2"]), "divergence": "js", "alpha": None}
    checkpoint.check_fingerprint(ck, fp)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"divergence='js' there, 'kl' here"):
        checkpoint.check_fingerprint(ck, {**fp, "divergence": "kl"})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="model="):
        checkpoint.check_fingerprint(ck, {**fp, "model": checkpoint.model_config_hash(models["llama"])})


def test_export_loads_in_transformers_and_equals_policy(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    used = export_latest(run["out"] / "run", tmp_path / "hf")
    assert used == checkpoint.find_latest(run["out"] / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    saved = run["ranks"][0]["saved_params"]
    assert set(saved) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    ids = tok("def f", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
