"""Contexts of a conditional target: the prompts file, and which prompt each sample continues.

A prompts file is JSON Lines, one object per line with a ``"prompt"`` string (JSON keeps code prompts with
newlines and quotes intact). Prompt ``i`` is context ``i``: it gets its own target P(x|c) and its own Z(c).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdpg_scale.errors import ConfigError
from fdpg_scale.models.tokens import start_id

__all__ = ["PromptSet", "load_prompts"]


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    """The prompts as text (what scorers see as ``Samples.contexts``)."""
    token_ids: tuple[tuple[int, ...], ...]
    """Each prompt tokenised, the start token first (BOS, else EOS: ``models/tokens.py``); what the model is
    conditioned on."""

    def __len__(self) -> int:
        return len(self.texts)

    def draw(self, n: int, seed: int) -> np.ndarray:
        """[n] context ids drawn uniformly with ``seed`` (a chunk's seed: the same on any world size)."""
        return np.random.default_rng(seed).integers(0, len(self.texts), size=n)


def load_prompts(path: str | Path, tokenizer) -> PromptSet:
    """Read and tokenise a prompts file (see the module docstring); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"target.prompts_file {str(path)!r} does not exist")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"target.prompts_file {str(path)!r} line {number}: expected a JSON object with a "
                              f"\"prompt\" string") from None
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"target.prompts_file {str(path)!r} line {number}: \"prompt\" must be a non-empty "
                              f"string")
        texts.append(prompt)
    if not texts:
        raise ConfigError(f"target.prompts_file {str(path)!r} holds no prompt")
    start = start_id(tokenizer)
    ids = tuple((start, *tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return PromptSet(texts=tuple(texts), token_ids=ids)
