"""A tiny sequence classifier built on the spot (no download): a local stand-in for a sentiment or toxicity
model, for ``target.scorer: hf-classifier`` in smoke runs, examples and tests.

``build_tiny_classifier_dir(path, seed=0)`` writes a Hugging Face directory that
``AutoModelForSequenceClassification`` / ``AutoTokenizer`` load: a ``GPT2ForSequenceClassification``
(2 layers, width 64, labels ``negative`` / ``positive``) with random weights drawn from ``seed``, and the same
byte-level BPE tokenizer as the tiny causal LM (``fdpg_scale.models.tiny``). Its scores mean nothing; they are
a deterministic function of the text, which is what the plumbing needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fdpg_scale.models.cache import build_cached_dir
from fdpg_scale.models.tiny import train_tiny_tokenizer

__all__ = ["build_tiny_classifier_dir", "LABELS"]

LABELS = ("negative", "positive")
_STAMP = "tiny_classifier.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", _STAMP)


def build_tiny_classifier_dir(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) the tiny classifier directory at ``path`` (the stamped cache of ``models/cache.py``);
    returns it as a Path. A directory already at ``path`` that is not this build (another seed, or not built
    here) is an error rather than being overwritten."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    stamp = {"seed": int(seed), "labels": list(LABELS), "format_version": 1}

    def build(tmp: Path) -> None:
        tokenizer = train_tiny_tokenizer()
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, num_labels=len(LABELS),
                            id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            torch.manual_seed(seed)
            model = GPT2ForSequenceClassification(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    build_cached_dir(path, stamp, build, stamp_name=_STAMP, required=_REQUIRED,
                     what=f"a tiny classifier with seed {seed}")
    return Path(path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="directory to write (e.g. .cache/models/tiny-classifier)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_classifier_dir(args.path, seed=args.seed))
