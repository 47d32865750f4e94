"""Contexts of a conditional target: the prompts, how each is tokenised, and which prompt each sample continues.

Where prompts come from: ``target.prompts`` (a file, a dataset directory or a cached Hub dataset id, read with
the ``datasets`` library: ``training/prompt_table.py``) with its ``target.split`` and ``target.prompt_column``;
or the older ``target.prompts_file``, a JSON Lines file of {"prompt": ...} objects. Prompt ``i`` is context
``i``: it gets its own target P(x|c) and its own Z(c).

A prompt is a non-empty string or a list of {"role", "content"} messages. How it becomes tokens:

- with a chat template (``target.chat_template`` true, or null and the tokenizer has one): the messages (a
  string is one user message) rendered by ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
  and tokenised as they are: the template writes its own start (``<|im_start|>``, Llama's BOS);
- without: the start token (BOS, else EOS: ``models/tokens.py``) followed by the prompt's tokens; a list of
  messages then needs a template and is an error.

Scorers see each sample's prompt as its context text: the string, or the content of the last message. The
other columns of a ``target.prompts`` dataset (``target.metadata_columns``) are kept per prompt
(``PromptSet.metadata``) and reach ``package.module:function`` scorers as keyword arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fdpg_scale.errors import ConfigError
from fdpg_scale.models.tokens import start_id

__all__ = ["PromptSet", "load_prompts", "load_target_prompts", "uses_chat_template"]


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    """The prompts as text (what scorers see as ``Samples.contexts``)."""
    token_ids: tuple[tuple[int, ...], ...]
    """Each prompt tokenised (module docstring); what the model is conditioned on."""
    metadata: dict[str, tuple] = field(default_factory=dict, hash=False)
    """column name -> one value per prompt: the dataset columns that function scorers receive."""

    def __len__(self) -> int:
        return len(self.texts)

    def draw(self, n: int, seed: int) -> np.ndarray:
        """[n] context ids drawn uniformly with ``seed`` (a chunk's seed: the same on any world size)."""
        return np.random.default_rng(seed).integers(0, len(self.texts), size=n)

    def metadata_of(self, context_ids) -> dict[str, list] | None:
        """column -> [B] values of the prompts that samples with these ``context_ids`` ([B] ints) continue;
        None when the prompts carry no metadata (what ``Samples.metadata`` holds)."""
        if not self.metadata:
            return None
        rows = [int(c) for c in context_ids]
        return {name: [values[c] for c in rows] for name, values in self.metadata.items()}


def uses_chat_template(chat_template: bool | None, tokenizer) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (``target.chat_template``: null = when the
    tokenizer has one); true on a tokenizer without one is a one-line ConfigError."""
    has = getattr(tokenizer, "chat_template", None) is not None  # duck-typed: test tokenizers may lack the attribute
    if chat_template and not has:
        raise ConfigError(f"target.chat_template is true, but the tokenizer {tokenizer.name_or_path!r} has no chat "
                          f"template (set target.chat_template to false or null, or use a chat model's tokenizer)")
    return has if chat_template is None else chat_template


def load_target_prompts(target, tokenizer) -> PromptSet | None:
    """The contexts of the ``target`` section (a ``TargetConfig``); None for an unconditional target."""
    if target.prompts_file is not None:
        return load_prompts(target.prompts_file, tokenizer, chat_template=target.chat_template)
    if target.prompts is None:
        if target.chat_template:
            raise ConfigError("target.chat_template is true, but the target has no prompts (target.prompts): an "
                              "unconditional sample starts from the start token (BOS, else EOS)")
        return None
    from fdpg_scale.training.prompt_table import read_table

    label = f"target.prompts {target.prompts!r}"
    table = read_table(target.prompts, target.split)
    columns = list(table)
    if target.prompt_column not in table:
        raise ConfigError(f"{label} has no column {target.prompt_column!r} (target.prompt_column; its columns: "
                          f"{', '.join(columns)})")
    wanted = [c for c in columns if c != target.prompt_column] if target.metadata_columns is None \
        else list(target.metadata_columns)
    missing = [c for c in wanted if c not in table]
    if missing:
        raise ConfigError(f"{label} has no column {missing[0]!r} (target.metadata_columns; its columns: "
                          f"{', '.join(columns)})")
    texts, ids = _encode(table[target.prompt_column], tokenizer, chat_template=target.chat_template,
                         where=lambda i: f"{label} row {i} (counting from 0), column {target.prompt_column!r}")
    return PromptSet(texts=texts, token_ids=ids, metadata={c: tuple(table[c]) for c in wanted})


def load_prompts(path: str | Path, tokenizer, *, chat_template: bool | None = None) -> PromptSet:
    """Read and tokenise a JSON Lines prompts file (``target.prompts_file``); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"target.prompts_file {str(path)!r} does not exist")
    prompts, lines = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"target.prompts_file {str(path)!r} line {number}: expected a JSON object with a "
                              f"\"prompt\" string") from None
        lines.append(number)
    if not prompts:
        raise ConfigError(f"target.prompts_file {str(path)!r} holds no prompt")
    texts, ids = _encode(prompts, tokenizer, chat_template=chat_template,
                         where=lambda i: f"target.prompts_file {str(path)!r} line {lines[i]}: \"prompt\"")
    return PromptSet(texts=texts, token_ids=ids)


def _encode(prompts: list, tokenizer, *, chat_template: bool | None, where) -> tuple[tuple, tuple]:
    """(texts, token ids) of each prompt (module docstring); where(i): how an error names prompt i."""
    template = uses_chat_template(chat_template, tokenizer)
    texts, ids = [], []
    start = None if template else start_id(tokenizer)
    for i, prompt in enumerate(prompts):
        messages = _messages(prompt, lambda: where(i))
        if template:
            tokens = tokenizer(_render(tokenizer, messages, where(i)), add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str):
            tokens = [start, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        else:
            raise ConfigError(f"{where(i)} is a list of messages, but prompts are not rendered with a chat template "
                              f"(target.chat_template is false, or the tokenizer has none): give strings instead")
        texts.append(messages[-1]["content"])
        ids.append(tuple(int(t) for t in tokens))
    return tuple(texts), tuple(ids)


def _messages(prompt, where) -> list[dict]:
    """A prompt as a chat: a string is one user message; a list must hold {role, content} string mappings."""
    if isinstance(prompt, str) and prompt:
        return [{"role": "user", "content": prompt}]
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    if not ok:
        raise ConfigError(f"{where()} must be a non-empty string or a list of {{\"role\", \"content\"}} messages "
                          f"with string values, got {_short(prompt)}")
    return [dict(m) for m in prompt]


def _render(tokenizer, messages: list[dict], where: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:   # a template may refuse a conversation (e.g. roles out of order)
        raise ConfigError(f"{where}: the chat template refuses this prompt ({' '.join(str(err).split())[:200]})") \
            from None


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"
