"""``fdpg-scale pretrain-base``: a small GPT-2 pretrained offline on the Python standard library's source.

Nothing can be downloaded at run time, so the project builds its own base model from a corpus every machine
has (``fdpg_scale.models.corpus``: the stdlib's ``.py`` files, split by document into train / held-out):

1. tokenizer: a byte-level BPE (the ``tokenizers`` package) with ``vocab_size`` entries, trained on the train
   split, with the project's special tokens (``fdpg_scale.models.bpe``: ``<|bos|>``, ``<|eos|>``, ``<|pad|>``);
2. data: every document is encoded as ``[bos] + tokens + [eos]``; the documents are concatenated and cut
   into non-overlapping blocks of ``block_size`` tokens (the remainder is dropped): train ``[N, T]``,
   held-out ``[M, T]``;
3. model: ``GPT2Config(n_layer, n_embd, n_head, n_positions=block_size)``, no dropout, head tied to the
   token embedding; plain torch, fp32, AdamW with linear warm-up then cosine decay to 10 % of ``lr``,
   gradient clipping at 1.0, ``steps`` steps of ``batch_size`` blocks drawn in a seeded random order
   (a fresh permutation of the train blocks per epoch);
4. evaluation: token-level perplexity exp(mean NLL) on the held-out blocks (the first ``eval_blocks`` of
   them), predicting positions 1..T-1 of each block from the positions before it, against a unigram model
   on the *same* target tokens: p(v) = (count_train(v) + 1) / (N_train + V) (add-one smoothing).

Determinism: the weights are a function of (corpus, config, seed) -- the initialisation is seeded and the
batch order comes from a seeded ``torch.Generator``; the step count is fixed (no wall-clock budget).
Bit-identical weights hold on one machine with the same torch build and thread count (``--threads``, 2 by
default): a different number of threads changes the order of floating-point reductions.

Output: a Hugging Face directory at ``--out`` (config.json, model.safetensors, tokenizer files,
generation_config.json with neutral defaults, ``pretrain_report.json``, stamp ``pretrain_base.json``).
It is written to a temporary sibling and renamed into place. The stamp records the config, the seed, the
Python version and a hash of the corpus; a second run whose stamp matches returns at once ("cached"). A
stale build of ours (other config, other stdlib) at ``--out`` is replaced; any other directory there is
an error rather than being overwritten.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from fdpg_scale.core.lr_schedule import lr_factor
from fdpg_scale.errors import ConfigError
from fdpg_scale.models.base_config import DEFAULT_OUT, PretrainConfig
from fdpg_scale.models.bpe import train_bpe_tokenizer
from fdpg_scale.models.cache import build_cached_dir, is_built, read_stamp
from fdpg_scale.models.corpus import Document, collect_documents, corpus_hash, split_documents, stdlib_dir

__all__ = ["PretrainConfig", "encode_blocks", "unigram_log_probs", "heldout_perplexity", "build_base_model",
           "render_doc", "run"]

STAMP = "pretrain_base.json"
REPORT = "pretrain_report.json"
_FORMAT_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", REPORT)
#: The cosine decays the learning rate to this fraction of ``lr`` at the last step.
LR_FLOOR = 0.1
#: Gradient norm clipping.
GRAD_CLIP = 1.0
#: AdamW betas (β₂ = 0.95 as in GPT-style pretraining: faster to adapt on a short run).
BETAS = (0.9, 0.95)
#: The report's smoothed final training loss averages this many last steps.
LOSS_TAIL = 20
#: The report's sample from <|bos|>: temperature and top-k.
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 50


def encode_blocks(tokenizer, docs: list[Document], block_size: int) -> tuple[torch.Tensor, int]:
    """Encode ``[bos] + doc + [eos]`` per document, concatenate, cut into blocks.

    Returns (blocks ``[n_blocks, block_size]`` int64, total tokens in the stream before the remainder was
    dropped). ``n_blocks`` may be 0 when the stream is shorter than one block.
    """
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    stream = torch.tensor(ids, dtype=torch.int64)
    n_blocks = stream.numel() // block_size
    return stream[: n_blocks * block_size].view(n_blocks, block_size), stream.numel()


def unigram_log_probs(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities ``[vocab_size]`` (float64) from token ids ``blocks``."""
    counts = torch.bincount(blocks.reshape(-1), minlength=vocab_size).to(torch.float64)
    return torch.log((counts + 1.0) / (counts.sum() + vocab_size))


@torch.no_grad()
def heldout_perplexity(model, blocks: torch.Tensor, log_unigram: torch.Tensor, batch_size: int) -> dict:
    """Model and unigram perplexity on the targets ``blocks[:, 1:]`` (``blocks``: ``[M, T]`` int64).

    The model predicts position t from positions < t of the same block; the unigram scores the same
    targets, so the two perplexities are over identical tokens. Returns a dict of floats and counts.
    """
    model.eval()
    nll_model = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].double()  # [B, T-1, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        nll_model -= logp.sum().item()
    targets = blocks[:, 1:]
    n = targets.numel()
    nll_unigram = -log_unigram[targets].sum().item()
    return {"tokens": n, "model_nll": nll_model / n, "unigram_nll": nll_unigram / n,
            "model_ppl": math.exp(nll_model / n), "unigram_ppl": math.exp(nll_unigram / n)}


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """The project's schedule (``core.lr_schedule``): linear warm-up, then cosine to ``LR_FLOOR · lr``."""
    return cfg.lr * lr_factor(step, warmup_steps=cfg.warmup_steps, schedule="cosine", total_steps=cfg.steps,
                              floor=LR_FLOOR)


def _train(model, blocks: torch.Tensor, cfg: PretrainConfig, log_every: int) -> list[float]:
    """``cfg.steps`` AdamW steps on batches of ``blocks`` ``[N, T]``; returns the per-step training loss."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
    order, pos, losses = torch.randperm(blocks.shape[0], generator=gen), 0, []
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = []
        while len(idx) < cfg.batch_size:  # a fresh permutation per epoch; a batch may straddle two epochs
            if pos == order.numel():
                order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
            take = min(cfg.batch_size - len(idx), order.numel() - pos)
            idx.extend(order[pos:pos + take].tolist())
            pos += take
        x = blocks[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            print(f"step {step + 1}/{cfg.steps}  loss {losses[-1]:.3f}  lr {_lr_at(step, cfg):.2e}  "
                  f"{rate:.2f} steps/s", flush=True)
    return losses


def _stamp(cfg: PretrainConfig, docs_hash: str) -> dict:
    weights_cfg = {k: v for k, v in asdict(cfg).items() if k != "threads"}
    return {"format_version": _FORMAT_VERSION, "python": ".".join(map(str, sys.version_info[:3])),
            "corpus_sha256": docs_hash, "config": weights_cfg}


def _sample(model, tokenizer, seed: int, max_new_tokens: int) -> str:
    """One sample from ``<|bos|>`` (``SAMPLE_TEMPERATURE``, ``SAMPLE_TOP_K``), under a private RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.tensor([[tokenizer.bos_token_id]])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                             temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)


def _build(tmp: Path, cfg: PretrainConfig, train_docs, heldout_docs, stamp: dict, log_every: int) -> dict:
    """Tokenizer + model trained and evaluated, written into ``tmp`` (all but the stamp); returns the report."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    t_start = time.perf_counter()
    tokenizer = train_bpe_tokenizer([d.text for d in train_docs], cfg.vocab_size, cfg.block_size)
    train_blocks, train_tokens = encode_blocks(tokenizer, train_docs, cfg.block_size)
    held_blocks, held_tokens = encode_blocks(tokenizer, heldout_docs, cfg.block_size)
    if train_blocks.shape[0] < 1 or held_blocks.shape[0] < 1:
        raise ValueError(f"the corpus is too small for block_size={cfg.block_size}: {train_blocks.shape[0]} "
                         f"train and {held_blocks.shape[0]} held-out blocks (need at least 1 of each)")
    held_blocks = held_blocks[: cfg.eval_blocks]
    t_data = time.perf_counter() - t_start
    chars = sum(len(d.text) for d in train_docs)
    print(f"tokenizer: vocab {len(tokenizer)}, {chars / train_tokens:.2f} chars/token; data: "
          f"{train_blocks.shape[0]} train blocks, {held_blocks.shape[0]} held-out blocks of {cfg.block_size} "
          f"tokens; {cfg.batch_size * cfg.block_size} tokens/step, "
          f"{cfg.steps * cfg.batch_size / train_blocks.shape[0]:.2f} epochs ({t_data:.1f} s)", flush=True)

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seed a private RNG state: the caller's RNG does not move
        torch.manual_seed(cfg.seed)
        model = GPT2LMHeadModel(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {cfg.n_layer} layers, n_embd {cfg.n_embd}, {n_params / 1e6:.2f} M parameters", flush=True)

    t0 = time.perf_counter()
    losses = _train(model, train_blocks, cfg, log_every)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_unigram = unigram_log_probs(train_blocks, len(tokenizer))
    ppl = heldout_perplexity(model, held_blocks, log_unigram, cfg.batch_size)
    t_eval = time.perf_counter() - t0
    sample = _sample(model, tokenizer, cfg.seed, max_new_tokens=cfg.block_size - 1)  # fits the context

    # Neutral generation defaults: sampling settings always come from the caller explicitly.
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tail = losses[-min(LOSS_TAIL, len(losses)):]
    report = {
        **stamp,
        "threads": cfg.threads, "torch": torch.__version__,
        "corpus": {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                   "train_chars": chars, "train_tokens": train_tokens, "heldout_tokens": held_tokens,
                   "train_blocks": int(train_blocks.shape[0]), "eval_blocks": int(held_blocks.shape[0])},
        "parameters": n_params,
        "epochs": cfg.steps * cfg.batch_size / train_blocks.shape[0],
        "train_loss_first": losses[0], "train_loss_last20_mean": sum(tail) / len(tail),
        "heldout": ppl,
        "seconds": {"data": t_data, "train": t_train, "eval": t_eval,
                    "total": time.perf_counter() - t_start},
        "steps_per_second": cfg.steps / t_train, "tokens_per_second": cfg.steps * cfg.batch_size * cfg.block_size
                                                                     / t_train,
        "sample": sample,
    }
    (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def build_base_model(cfg: PretrainConfig, out: str | os.PathLike = DEFAULT_OUT, corpus: str | os.PathLike | None = None,
                     log_every: int = 50) -> tuple[Path, dict, bool]:
    """Build (or reuse) the pretrained base model at ``out``; returns (out, report, was_cached).

    corpus: the directory of ``.py`` files (default: the running interpreter's standard library).
    """
    out = Path(out)
    docs = collect_documents(corpus)
    train_docs, heldout_docs = split_documents(docs, cfg.heldout_fraction)
    stamp = _stamp(cfg, corpus_hash(docs))
    if is_built(out, stamp, STAMP, _REQUIRED):
        return out, json.loads((out / REPORT).read_text()), True
    if out.exists() and read_stamp(out, STAMP) is None:  # checked before the long build, not after it
        raise FileExistsError(f"--out {out} exists but is not a pretrain-base build (no valid {STAMP}); "
                              f"remove it or choose another --out")
    print(f"pretraining on {len(train_docs)} train / {len(heldout_docs)} held-out documents from "
          f"{corpus or stdlib_dir()} (Python {stamp['python']}, corpus sha256 {stamp['corpus_sha256'][:12]})",
          flush=True)
    report = {}

    def build(tmp: Path) -> None:
        report.update(_build(tmp, cfg, train_docs, heldout_docs, stamp, log_every))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        build_cached_dir(out, stamp, build, stamp_name=STAMP, required=_REQUIRED, what="a pretrain-base build",
                         replace_stale=True)  # a stale build of ours (other config, other stdlib) is rebuilt
    finally:
        torch.set_num_threads(threads_before)
    return out, report, False


def render_doc(report: dict, command: str) -> str:
    """The Markdown page docs/base_model.md, from a ``pretrain_report.json`` dict."""
    c, h, s, cfg = report["corpus"], report["heldout"], report["seconds"], report["config"]
    rows = [
        ("Python (corpus)", f"{report['python']} (corpus sha256 `{report['corpus_sha256'][:16]}`)"),
        ("documents train / held-out", f"{c['train_documents']} / {c['heldout_documents']}"),
        (f"train tokens ({c['train_chars'] / c['train_tokens']:.2f} chars/token)", f"{c['train_tokens']}"),
        ("tokenizer", f"byte-level BPE, vocab {cfg['vocab_size']}"),
        ("model", f"GPT-2, {cfg['n_layer']} layers, n_embd {cfg['n_embd']}, {cfg['n_head']} heads, context "
                  f"{cfg['block_size']}, {report['parameters'] / 1e6:.2f} M parameters"),
        ("training", f"{cfg['steps']} steps x {cfg['batch_size']} blocks x {cfg['block_size']} tokens "
                     f"({report['epochs']:.2f} epochs), AdamW lr {cfg['lr']:g}, cosine, seed {cfg['seed']}"),
        ("train loss first step / mean of last 20",
         f"{report['train_loss_first']:.3f} / {report['train_loss_last20_mean']:.3f}"),
        ("wall time: data / train / eval / total", f"{s['data']:.1f} s / {s['train']:.1f} s / {s['eval']:.1f} s / "
                                                   f"{s['total']:.1f} s ({report['threads']} threads, "
                                                   f"torch {report['torch']})"),
        ("throughput", f"{report['steps_per_second']:.2f} steps/s, {report['tokens_per_second']:.0f} tokens/s"),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return f"""# The base model: a GPT-2 pretrained on the Python standard library

Generated by `{command}` from its `{REPORT}`; do not edit by hand.

fdpg-scale downloads nothing at run time, so its embedded demo starts from a base model that it pretrains
itself on a corpus every machine has: the `.py` files of the running interpreter's standard library
(tests, GUI code, generated tables and site-packages excluded; see `fdpg_scale/models/corpus.py`), split
by document (a hash of the file path) into train and held-out. Recipe and determinism: `fdpg_scale/apps/pretrain.py`.

{table}
Wall times are those of the run that wrote this page; other jobs sharing its CPU inflate them.

## Held-out perplexity

Token-level, over {h['tokens']} target tokens of {c['eval_blocks']} held-out blocks (each block's positions
1..{cfg['block_size'] - 1}), the two models scored on the same tokens. The unigram is the train split's token
frequencies with add-one smoothing.

| model | NLL (nats/token) | perplexity |
|---|---|---|
| unigram (add-one) | {h['unigram_nll']:.3f} | {h['unigram_ppl']:.1f} |
| GPT-2 (this model) | {h['model_nll']:.3f} | {h['model_ppl']:.1f} |

## A sample from `<|bos|>` (temperature 0.8, top-k 50)

```python
{report['sample']}
```
"""


def run(args) -> int:
    """``fdpg-scale pretrain-base [--out DIR] [--corpus DIR] [--steps N] ...`` (arguments parsed by
    ``fdpg_scale.apps.cli``, one option per ``PretrainConfig`` field); returns the exit status."""
    if args.log_every < 1:
        raise ConfigError(f"--log-every must be >= 1, got {args.log_every}")
    try:
        cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    except ValueError as err:
        raise ConfigError(f"pretrain-base: {err}") from None
    try:
        out, report, cached = build_base_model(cfg, args.out, args.corpus, args.log_every)
    except (ValueError, FileExistsError) as err:
        print(f"fdpg-scale pretrain-base: {err}", file=sys.stderr)
        return 2
    h = report["heldout"]
    print(f"{'cached' if cached else 'built'}: {out}")
    print(f"held-out perplexity over {h['tokens']} tokens:  model {h['model_ppl']:.2f}   "
          f"unigram {h['unigram_ppl']:.2f}")
    if not cached:
        print(f"sample from <|bos|>:\n{report['sample']}")
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(render_doc(report, "fdpg-scale " + " ".join(args.argv)))
        print(f"wrote {args.doc}")
    return 0
