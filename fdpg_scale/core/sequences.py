"""Masks and positions over token sequences, shared by generation, evaluation and the toy.

Layout: ``token_ids`` [B, T] (any integer dtype); a boolean mask [B, T] says which positions count.
"""

from __future__ import annotations

import torch

__all__ = ["first_eos_mask", "position_ids_from_mask"]


def first_eos_mask(token_ids: torch.Tensor, eos_id: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, T]: the positions of ``within`` (default: all) up to and including the first EOS among them.

    token_ids [B, T]; within: bool [B, T], e.g. the generated part of prompt + generation (an EOS in the
    prompt does not end the sequence). A row with no EOS keeps all of ``within``.
    """
    if within is None:
        within = torch.ones_like(token_ids, dtype=torch.bool)
    elif within.shape != token_ids.shape:
        raise ValueError(f"within shape {tuple(within.shape)} must equal token_ids shape {tuple(token_ids.shape)}")
    is_eos = ((token_ids == eos_id) & within).long()
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos  # EOS strictly before each position
    return within & (eos_before == 0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as transformers' generate computes them for left padding.

    attention_mask [B, T] (1 = token) -> int64 [B, T]; padded slots get 1 (their value is never attended to).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
