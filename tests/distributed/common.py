"""Data and configs shared by the engine workers and the tests that check them (same batches both sides)."""

from __future__ import annotations

import torch

GLOBAL_BATCH = 8
SEQ_LEN = 12
TRAIN_STEPS = 3
LR = 1e-2
WEIGHT_DECAY = 0.01
WARMUP = 1
# Adam divides by sqrt(v) + eps: with the usual eps=1e-8 an element whose gradient is ~0 turns fp32 rounding
# noise (different reduction orders on 1 and 2 ranks) into an O(lr) step, so no tolerance could tell bugs from
# noise. A larger eps keeps the update a smooth function of the gradient (|d update / d g| ≤ lr / eps).
ADAM_EPS = 1e-3
GRAD_CLIP = 1.0  # also DeepSpeed's default when the JSON omits "gradient_clipping"


def ds_config(world_size: int, micro_batch: int, accumulation: int) -> dict:
    """A ZeRO-3 CPU config with explicit batch sizes (what the trainer passes)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False,
                              "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": GRAD_CLIP,
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def batch(step: int, vocab: int, n: int = GLOBAL_BATCH) -> dict[str, torch.Tensor]:
    """A deterministic global batch: left-padded rows, per-sequence weights (like f-DPG's)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (n, SEQ_LEN), generator=g)
    pad = torch.randint(0, 4, (n,), generator=g)
    mask = (torch.arange(SEQ_LEN)[None, :] >= pad[:, None]).long()
    ids = ids.masked_fill(mask == 0, 2)
    weights = torch.randn(n, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask, "weights": weights}


def rows(b: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in b.items()}


def weighted_loss(token_logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-(w · Σ_t log p).mean(): the shape of the f-DPG loss."""
    return -(weights * token_logprobs.sum(1)).mean()


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every parameter of an engine's HF model, keyed by HF names (collective: all ranks
    call). Materialises the whole model on every rank, one tensor at a time: for the tests' tiny models."""
    import deepspeed

    out = {}
    for name, p in engine.module.hf_model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[name] = p.detach().to(torch.float32, copy=True).cpu()
    return out
