"""A tiny sequence classifier built on the spot (no download): a local stand-in for a sentiment or toxicity
model, for ``target.scorer: hf-classifier`` in smoke runs, examples and tests.

``build_tiny_classifier_dir(path, seed=0)`` writes a Hugging Face directory that
``AutoModelForSequenceClassification`` / ``AutoTokenizer`` load: a ``GPT2ForSequenceClassification``
(2 layers, width 64, labels ``negative`` / ``positive``) with random weights drawn from ``seed``, and the same
byte-level BPE tokenizer as the tiny causal LM (``fdpg_scale.models.tiny``). Its scores mean nothing; they are
a deterministic function of the text, which is what the plumbing needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fdpg_scale.models.tiny import _train_tokenizer

__all__ = ["build_tiny_classifier_dir", "LABELS"]

LABELS = ("negative", "positive")
_STAMP = "tiny_classifier.json"


def build_tiny_classifier_dir(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) the tiny classifier directory at ``path``; returns it as a Path.

    A directory already at ``path`` that is not this build (another seed, or not built here) is an error
    rather than being overwritten.
    """
    from transformers import GPT2Config, GPT2ForSequenceClassification

    path = Path(path)
    stamp = {"seed": int(seed), "labels": list(LABELS), "format_version": 1}
    if path.exists():
        try:
            if json.loads((path / _STAMP).read_text()) == stamp:
                return path
        except (OSError, ValueError):
            pass
        raise FileExistsError(f"{path} exists but is not a tiny classifier with seed {seed}; remove it or choose "
                              f"another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tokenizer = _train_tokenizer()
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, num_labels=len(LABELS),
                            id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            torch.manual_seed(seed)
            model = GPT2ForSequenceClassification(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:  # another process built the same directory first
            if json.loads((path / _STAMP).read_text()) != stamp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="directory to write (e.g. .cache/models/tiny-classifier)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_classifier_dir(args.path, seed=args.seed))
