"""A batch of generated sequences, as the target's scorers and the diversity metrics see it.

``Samples`` is what a scorer receives: the generated token ids (padded), which of them are real, and,
where available, the decoded texts and the context (prompt) each sample continues. It carries no
log-probabilities: those belong to the rollout (rollout.py) and the estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Samples"]


@dataclass(frozen=True, eq=False)
class Samples:
    """B generated sequences, padded to a common length T.

    ``eq=False``: tensors have no single truth value, so identity comparison is the only honest ``==``.
    """

    token_ids: torch.Tensor
    """LongTensor [B, T]: generated tokens (prompt excluded), padded on the right with anything."""
    mask: torch.Tensor
    """[B, T] bool (0/1 numbers are accepted and converted): True on generated tokens (EOS included when
    the generator emitted one), False on padding."""
    texts: list[str] | None = None
    """Decoded generations, one per row (len B), or None when no tokenizer is involved (toy problems)."""
    context_ids: torch.Tensor | None = None
    """LongTensor [B]: which context (prompt) each sample continues, for conditional targets P(x|c); samples
    with the same id share one target and one partition function Z(c). None: unconditional."""
    contexts: list[str] | None = None
    """The context text of each sample (len B, row i = the prompt that sample i continues), or None."""
    metadata: dict[str, list] | None = None
    """column name -> B values: the prompt dataset's other columns (e.g. a reference ``answer``), row i for the
    prompt sample i continues; what ``package.module:function`` scorers receive as keyword arguments. None:
    no metadata (unconditional, or prompts without extra columns)."""

    def __post_init__(self):
        ids, mask = self.token_ids, self.mask
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point \
                or ids.dtype == torch.bool:
            raise ValueError(f"Samples.token_ids must be an integer tensor [B, T], got "
                             f"{_describe(ids)}")
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(f"Samples.mask must be a tensor of token_ids' shape {tuple(ids.shape)}, got "
                             f"{_describe(mask)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"Samples.mask must be bool or 0/1 values, got dtype {mask.dtype} with other "
                                 f"values")
            object.__setattr__(self, "mask", mask.bool())
        b = ids.shape[0]
        for name in ("texts", "contexts"):
            value = getattr(self, name)
            if value is not None and len(value) != b:
                raise ValueError(f"Samples.{name} has {len(value)} entries for a batch of B={b} sequences")
        for name, values in (self.metadata or {}).items():
            if len(values) != b:
                raise ValueError(f"Samples.metadata[{name!r}] has {len(values)} entries for a batch of B={b} sequences")
        cid = self.context_ids
        if cid is not None:
            if not isinstance(cid, torch.Tensor) or cid.shape != (b,) or cid.dtype.is_floating_point \
                    or cid.dtype == torch.bool:
                raise ValueError(f"Samples.context_ids must be an integer tensor [B={b}], got {_describe(cid)}")

    @property
    def batch_size(self) -> int:
        """B."""
        return self.token_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: number of generated tokens of each sample."""
        return self.mask.sum(-1)

    def sequences(self) -> list[tuple[int, ...]]:
        """The B generated sequences as tuples of token ids (padding removed); hashable, for tabular scorers
        and n-gram statistics. Tokens are taken where ``mask`` is True, in order."""
        return [tuple(row[m].tolist()) for row, m in zip(self.token_ids, self.mask)]

    def select(self, index: torch.Tensor) -> Samples:
        """The sub-batch ``index`` (LongTensor [B′] of row indices, or a bool tensor [B]), every field kept."""
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        rows = index.tolist()
        return Samples(token_ids=self.token_ids[index], mask=self.mask[index],
                       texts=None if self.texts is None else [self.texts[i] for i in rows],
                       context_ids=None if self.context_ids is None else self.context_ids[index],
                       contexts=None if self.contexts is None else [self.contexts[i] for i in rows],
                       metadata=None if self.metadata is None else
                       {name: [values[i] for i in rows] for name, values in self.metadata.items()})


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
