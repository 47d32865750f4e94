"""pretrain-base on a tiny configuration: determinism, caching, bad input, report, HF loading."""

import json
import math
import shutil

import pytest
import torch

from fdpg_scale.apps import pretrain
from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.models.corpus import stdlib_dir
from fdpg_scale.apps.pretrain import PretrainConfig, build_base_model, heldout_perplexity, unigram_log_probs

# A configuration that trains in a few seconds on 2 cores and still learns the corpus' local statistics.
TINY = dict(steps=60, batch_size=8, block_size=64, vocab_size=512, n_layer=2, n_embd=32, n_head=4, lr=5e-3,
            warmup_steps=5, eval_blocks=32)
TINY_ARGV = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
FILES = ("argparse.py", "textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "queue.py")


def pretrain_base(argv):
    """``fdpg-scale pretrain-base ARGV``, in this process."""
    return cli_main(["pretrain-base", *argv])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        shutil.copy(stdlib_dir() / name, root / name)
    return root


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """The tiny model built twice from scratch into two directories."""
    base = tmp_path_factory.mktemp("models")
    return [build_base_model(PretrainConfig(**TINY), base / f"run{i}", corpus, log_every=1000) for i in range(2)]


def test_deterministic_for_a_seed(built):
    (a, rep_a, cached_a), (b, rep_b, cached_b) = built
    assert not cached_a and not cached_b
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert rep_a["heldout"] == rep_b["heldout"] and rep_a["sample"] == rep_b["sample"]


def test_other_seed_other_weights(built, corpus, tmp_path):
    out, _, _ = build_base_model(PretrainConfig(**{**TINY, "steps": 2, "seed": 1}), tmp_path / "m", corpus)
    assert (out / "model.safetensors").read_bytes() != (built[0][0] / "model.safetensors").read_bytes()


def test_report_beats_unigram(built):
    out, report, _ = built[0]
    assert json.loads((out / "pretrain_report.json").read_text()) == report
    h = report["heldout"]
    assert h["tokens"] == report["corpus"]["eval_blocks"] * (TINY["block_size"] - 1)
    assert math.isfinite(h["model_ppl"]) and math.isfinite(h["unigram_ppl"])
    # 60 tiny steps only reach the unigram plateau (measured: model 226, unigram 224, uniform 512); clearly
    # beating the unigram takes the default run (docs/base_model.md: 61 vs 593), too long for a test.
    # So: far better than uniform, within 10 % of the unigram, and the training loss fell.
    assert h["model_ppl"] < 0.6 * TINY["vocab_size"]
    assert h["model_ppl"] < 1.1 * h["unigram_ppl"]
    assert report["train_loss_last20_mean"] < report["train_loss_first"] - 0.5


def test_cached_second_run_does_not_train(built, corpus, monkeypatch, capsys):
    out = built[0][0]
    before = (out / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr(pretrain, "_build", no_training)
    assert pretrain_base(["--out", str(out), "--corpus", str(corpus), *TINY_ARGV]) == 0
    assert capsys.readouterr().out.startswith(f"cached: {out}")
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_stale_build_is_replaced_foreign_dir_refused(built, corpus, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(built[0][0], out)
    argv = ["--out", str(out), "--corpus", str(corpus), *TINY_ARGV, "--steps=3", "--warmup-steps=1"]
    assert pretrain_base(argv) == 0  # other steps: our stale build is rebuilt in place
    assert json.loads((out / "pretrain_base.json").read_text())["config"]["steps"] == 3
    assert (out / "model.safetensors").read_bytes() != (built[0][0] / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    foreign = tmp_path / "someone_elses_model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    capsys.readouterr()
    assert pretrain_base(["--out", str(foreign), "--corpus", str(corpus), *TINY_ARGV]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(foreign) in err and "--out" in err
    assert (foreign / "config.json").read_text() == "{}"


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8\n"])
def test_bad_corpus_one_line_error(tmp_path, capsys, content):
    bad = tmp_path / "nothing_here"
    bad.mkdir()
    if content is not None:
        (bad / "x.py").write_bytes(content)
    assert pretrain_base(["--corpus", str(bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "no readable" in err
    assert not (tmp_path / "m").exists()


def test_bad_flag_names_the_argument(capsys):
    assert pretrain_base(["--n-embd", "30", "--n-head", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "n_head (4) must divide n_embd (30)" in err


def test_loads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = built[0][0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len(tok) == TINY["vocab_size"] == model.config.vocab_size
    code = "def f(x):\n    return x + 1\n"
    ids = tok(code, add_special_tokens=False).input_ids
    assert tok.decode(ids) == code
    logits = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits
    assert logits.shape == (1, len(ids) + 1, TINY["vocab_size"]) and torch.isfinite(logits).all()
    gen = model.generation_config
    assert not gen.do_sample and gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id


def test_heldout_perplexity_of_the_unigram_is_the_unigram():
    """Oracle: a 'model' whose logits are the unigram log-probs everywhere scores exactly the unigram."""
    V, blocks = 11, torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(0))
    log_uni = unigram_log_probs(torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(1)), V)
    assert torch.logsumexp(log_uni, 0).abs() < 1e-12

    class Unigram(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": log_uni.float().expand(*input_ids.shape, V)})()

    h = heldout_perplexity(Unigram(), blocks, log_uni, batch_size=2)
    assert h["tokens"] == 5 * 6
    assert h["model_ppl"] == pytest.approx(h["unigram_ppl"], rel=1e-6)
    naive = math.exp(-sum(log_uni[t].item() for t in blocks[:, 1:].reshape(-1)) / 30)
    assert h["unigram_ppl"] == pytest.approx(naive, rel=1e-12)


def test_lr_schedule():
    """Warm-up (s+1)/w to the peak at step w−1, cosine down to LR_FLOOR·lr: the schedule the f-DPG engines use."""
    from fdpg_scale.distributed.engines import _lr_lambda

    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    lrs = [pretrain._lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    policy = _lr_lambda("cosine", 10, 100)  # the same warm-up; the policy's cosine ends at 0
    assert [policy(s) * cfg.lr for s in range(10)] == pytest.approx(lrs[:10])
    assert policy(99) < 1e-3 and lrs[99] / cfg.lr - pretrain.LR_FLOOR == pytest.approx(policy(99) * 0.9, abs=1e-12)
