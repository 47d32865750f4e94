"""Special-token ids the samplers need, from any Hugging Face tokenizer.

Real GPT-2 and Llama tokenizers define no pad token (``tokenizer.pad_token_id is None``). Padding only fills
slots that the attention mask and ``gen_mask`` already exclude, so any valid id will do: the tokenizer's own
pad token when it has one, else its EOS token (what transformers' ``generate`` falls back to as well).
"""

from __future__ import annotations

__all__ = ["padding_id"]


def padding_id(tokenizer) -> int:
    """The id that fills padded slots: ``tokenizer.pad_token_id``, else ``tokenizer.eos_token_id``.

    Raises ValueError (naming the tokenizer) when it defines neither: there is then no id known to be valid.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} defines neither a "
                     f"pad token nor an EOS token: set one of them in its tokenizer_config.json")
