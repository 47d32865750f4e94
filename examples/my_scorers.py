"""Your own scorers: plain functions of the decoded texts, named in a config as ``examples.my_scorers:<function>``.

Each takes the list of decoded samples (one ``str`` each) first, the contexts as ``contexts=`` if it has that
parameter (a conditional target: ``target.prompts_file``), and ``target.scorer_args`` as keyword arguments; it
returns one number per sample. How the number enters the target is the config's ``kind``:

- ``pointwise``: a constraint, satisfied where the number is > 0;
- ``reward``: a reward r(x), P ∝ a·exp(r/β);
- ``feature``: a feature φ(x) whose mean under the target is fixed (``moment``).

Nothing here imports fdpg_scale: a scorer is an ordinary function that can be tested on its own.
"""

import re


def has_docstring(texts):
    """1.0 where the text opens a triple-quoted string (a docstring, in Python source), else 0.0."""
    return [1.0 if '"""' in t or "'''" in t else 0.0 for t in texts]


def length_between(texts, *, low, high):
    """1.0 where the text has between ``low`` and ``high`` characters (inclusive), else 0.0."""
    return [1.0 if low <= len(t) <= high else 0.0 for t in texts]


def char_fraction(texts, *, chars):
    """The fraction of the text's characters that are in ``chars`` (0.0 for an empty text): a feature."""
    return [sum(c in chars for c in t) / len(t) if t else 0.0 for t in texts]


def repeats_context_word(texts, contexts=None):
    """1.0 where the continuation reuses a word (an identifier) of its prompt: a conditional constraint.
    Without contexts (an unconditional target) nothing can be reused: 0.0."""
    if contexts is None:
        return [0.0] * len(texts)
    out = []
    for text, context in zip(texts, contexts):
        words = set(re.findall(r"[A-Za-z_]\w+", context))
        out.append(1.0 if words & set(re.findall(r"[A-Za-z_]\w+", text)) else 0.0)
    return out


def mentions_answer(texts, *, answer):
    """1.0 where the continuation contains its prompt's reference answer, else 0.0. ``answer`` is a column of the
    prompt dataset (``target.prompts``): one value per sample, the answer of the prompt that sample continues."""
    return [1.0 if str(a) in t else 0.0 for t, a in zip(texts, answer)]
