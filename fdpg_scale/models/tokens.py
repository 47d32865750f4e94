"""Special-token ids the samplers need, from any Hugging Face tokenizer.

Real GPT-2 and Llama tokenizers define no pad token (``tokenizer.pad_token_id is None``). Padding only fills
slots that the attention mask and ``gen_mask`` already exclude, so any valid id will do: the tokenizer's own
pad token when it has one, else its EOS token (what transformers' ``generate`` falls back to as well).

Qwen2/Qwen3 tokenizers define no BOS token (``bos_token: null``). Every sequence the trainer samples starts
from a *start token*: BOS when the tokenizer has one, else EOS. A model pretrained on documents joined by EOS
(Qwen's ``<|endoftext|>``, GPT-2's) has seen EOS right before the start of every document, so EOS is the
token an unconditional sample of such a model continues. A prompt without a chat template gets the same start
token in front; a prompt rendered by a chat template starts with what the template writes (training/prompts.py).
"""

from __future__ import annotations

__all__ = ["padding_id", "start_id", "special_token_problem"]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", type(tokenizer).__name__)


def padding_id(tokenizer) -> int:
    """The id that fills padded slots: ``tokenizer.pad_token_id``, else ``tokenizer.eos_token_id``.

    Raises ValueError (naming the tokenizer) when it defines neither: there is then no id known to be valid.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {_name(tokenizer)!r} defines neither a pad token nor an EOS token: set one of them "
                     f"in its tokenizer_config.json")


def start_id(tokenizer) -> int:
    """The token every unconditional sample (and every prompt without a chat template) starts from:
    ``tokenizer.bos_token_id``, else ``tokenizer.eos_token_id`` (module docstring).

    Raises ValueError (naming the tokenizer) when it defines neither.
    """
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {_name(tokenizer)!r} defines neither a BOS token nor an EOS token, so a sample has "
                     f"no token to start from: set \"bos_token\" or \"eos_token\" in its tokenizer_config.json")


def special_token_problem(tokenizer) -> str | None:
    """What the trainer cannot do with this tokenizer's BOS, EOS and pad tokens, checked together; None if
    nothing. Without BOS the start token is EOS, without pad the padding is EOS: only EOS missing as well
    as one of the other two is a problem."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is not None:
        return None
    missing = [name for name, value in (("BOS", bos), ("pad", pad)) if value is None]
    if not missing:
        return None
    needs = {"BOS": "a sample has no token to start from (BOS, else EOS)",
             "pad": "batches have no token to pad with (pad, else EOS)"}
    what = ("no BOS, EOS or pad token" if len(missing) == 2 else f"neither a {missing[0]} token nor an EOS token")
    return (f"the tokenizer defines {what} (bos_token_id={bos}, eos_token_id=None, pad_token_id={pad}): "
            f"{'; '.join(needs[m] for m in missing)}; set \"eos_token\" in its tokenizer_config.json")
