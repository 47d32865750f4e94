"""What determines the stdlib base model (``fdpg-scale pretrain-base``): its config and default location.

Light on purpose (no torch): the command line builds ``pretrain-base``'s options from these fields, and
``fdpg-scale prompts`` reads the held-out fraction, without loading the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fdpg_scale.models.bpe import MIN_VOCAB_SIZE

__all__ = ["PretrainConfig", "DEFAULT_OUT"]

DEFAULT_OUT = Path(".cache/models/stdlib-gpt2")


@dataclass(kw_only=True, frozen=True)
class PretrainConfig:
    """What determines the weights (all recorded in the stamp), plus ``threads``."""

    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    steps: int = 500
    """Optimizer steps (a step budget, not a time budget, so the result is deterministic)."""
    batch_size: int = 32
    """Blocks per step."""
    block_size: int = 128
    """Tokens per block; also the model's n_positions."""
    vocab_size: int = 2048
    """BPE vocabulary size, special tokens included."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Hidden size."""
    n_head: int = 4
    """Attention heads (must divide n_embd)."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 30
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    heldout_fraction: float = 0.05
    """Fraction of documents held out (by a hash of their path)."""
    eval_blocks: int = 512
    """Held-out blocks scored (the first ones, in corpus order)."""
    threads: int = 2
    """torch intra-op threads; not part of the stamp, but bitwise results depend on it."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "block_size", "n_layer", "n_embd", "n_head", "eval_blocks", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (one context and one target token), got {self.block_size}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + 3 special tokens + 1), "
                             f"got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, weight_decay >= 0; got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
