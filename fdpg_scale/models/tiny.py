"""A tiny causal LM and tokenizer built on the spot (no download), for smoke runs and tests.

``build_tiny_model_dir(path, arch="gpt2" | "llama", seed=0)`` writes a Hugging Face directory
(config.json, model.safetensors, tokenizer.json + tokenizer_config.json, generation_config.json) that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load:

- tokenizer: the project's byte-level BPE (``fdpg_scale.models.bpe``) trained in-process on a fixed built-in
  text, so it is identical on every machine and Python version; special tokens ``<|bos|>``, ``<|eos|>``,
  ``<|pad|>``;
- model: ``GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64)`` with the head tied to the token
  embedding, or a Llama of the same size with an untied head (``tie_word_embeddings=False``), initialised
  from ``seed`` (bit-identical for a seed on one machine).

The directory is cached (``fdpg_scale.models.cache``): a ``tiny_model.json`` stamp records what was built,
and a directory whose stamp matches and whose files are all present is reused as is. The build writes into a
temporary sibling and renames it into place, so concurrent builders (several ranks) and a build killed
halfway never leave a half-written directory at ``path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fdpg_scale.models.bpe import train_bpe_tokenizer
from fdpg_scale.models.cache import build_cached_dir

__all__ = ["train_tiny_tokenizer", "build_tiny_model_dir", "TINY_ARCHS"]

TINY_ARCHS = ("gpt2", "llama")
_STAMP = "tiny_model.json"
_FORMAT_VERSION = 1  # bump when the recipe below changes, so stale caches are rebuilt
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
VOCAB_SIZE = 384  # 256 byte symbols + 3 specials + 125 merges: large enough to exercise V > H in the head
CONTEXT = 64  # tokens: the models' n_positions and the tokenizer's model_max_length

# Training text for the tokenizer: fixed here (not read from the Python installation) so that the
# vocabulary, hence the model's shapes, is the same on every machine.
_CORPUS = """\
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Counter:
    \"\"\"Count the events seen so far.\"\"\"

    def __init__(self, start=0):
        self.value = start

    def add(self, amount=1):
        self.value += amount
        return self.value


The quick brown fox jumps over the lazy dog. A language model assigns a probability to every
sequence of tokens; sampling draws one token at a time from the model's conditional distribution.
We train the model toward a target distribution by minimising an f-divergence between the two.
import os, sys, math, json
for line in open(path):
    if line.startswith("#"):
        continue
    print(line.strip())
"""


def _model_config(arch: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT, tie_word_embeddings=True, **ids)
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=False, **ids)


def _stamp(arch: str, seed: int) -> dict:
    return {"arch": arch, "seed": int(seed), "format_version": _FORMAT_VERSION}


def train_tiny_tokenizer():
    """The tiny models' byte-level BPE tokenizer (``VOCAB_SIZE`` ids, trained on the few lines above;
    deterministic), shared by the tiny causal LMs and the tiny classifier."""
    return train_bpe_tokenizer(_CORPUS.splitlines(keepends=True), VOCAB_SIZE, CONTEXT)


def build_tiny_model_dir(path: str | os.PathLike, arch: str = "gpt2", seed: int = 0) -> Path:
    """Build (or reuse) a tiny HF model + tokenizer directory at ``path``; returns ``path`` as a Path.

    arch: ``"gpt2"`` (tied head) or ``"llama"`` (untied head). seed: initialisation seed of the weights.
    A directory already at ``path`` that holds a different build (other arch/seed, missing files) is an
    error rather than being overwritten: it may be someone's real model.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        tokenizer = train_tiny_tokenizer()
        config = _model_config(arch, tokenizer)
        # Seed a private generator state: building a model must not move the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Neutral generation defaults: sampling settings always come from the caller explicitly.
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                                   eos_token_id=config.eos_token_id,
                                                   pad_token_id=config.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)  # handles the tied wte/lm_head (one tensor)
        tokenizer.save_pretrained(tmp)

    build_cached_dir(path, _stamp(arch, seed), build, stamp_name=_STAMP, required=_REQUIRED,
                     what=f"a tiny {arch} model with seed {seed}")
    return Path(path)
