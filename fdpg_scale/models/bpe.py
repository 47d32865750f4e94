"""The byte-level BPE tokenizer of every model the project builds (the tiny test models and the stdlib base).

Byte-level: any text encodes (no unknown token) and decodes back exactly. Trained in-process with the
``tokenizers`` package; the three special tokens come first (ids 0, 1, 2), then the 256 byte symbols, then
the merges, up to ``vocab_size`` entries. Padding is on the left (prompts are left-padded for generation).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BOS", "EOS", "PAD", "MIN_VOCAB_SIZE", "train_bpe_tokenizer"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
#: 256 byte symbols + the 3 special tokens + at least one merge.
MIN_VOCAB_SIZE = 256 + 3 + 1


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE trained on ``texts`` with bos/eos/pad, as a ``PreTrainedTokenizerFast``.

    Deterministic: the same texts and vocab_size give the same vocabulary on every machine.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + 3 special tokens + 1), got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=model_max_length)
