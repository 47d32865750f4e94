"""Shared test helpers: verbose allclose and tolerances by dtype; the miniature reproduce grid."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import yaml

from fdpg_scale.experiments.grid import Grid
from fdpg_scale.models.base_config import PretrainConfig
from fdpg_scale.models.corpus import stdlib_dir

# (rtol, atol) for comparing a result computed from inputs of this dtype against a float64 reference.
# bf16 is loose on purpose: the Triton interpreter truncates fp32→bf16 instead of rounding (triton 3.7.1).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None,
                 atol: float | None = None, dtype: torch.dtype | None = None, name: str = "tensor") -> None:
    """assert |actual − expected| ≤ atol + rtol·|expected| elementwise, reporting the worst element."""
    if rtol is None or atol is None:
        d_rtol, d_atol = TOLERANCES[dtype or actual.dtype]
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~same_nonfinite & ~(err <= bound)
    if bad.any():
        idx = int(torch.nonzero(bad.flatten())[0]) if bad.any() else 0
        worst = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err)).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (rtol={rtol:g}, atol={atol:g}); "
            f"first at flat index {idx}: {a.flatten()[idx].item()!r} vs {e.flatten()[idx].item()!r}; "
            f"worst at {worst}: {a.flatten()[worst].item()!r} vs {e.flatten()[worst].item()!r} "
            f"(max abs err {err[~same_nonfinite].max().item():.3e})")


# ------------------------------------------------------------------------------ the miniature reproduce grid
# A base that pretrains in seconds on a few stdlib files (as tests/pretrain's), and runs of 2 steps of 8
# sequences: the quick mode's code path at a fraction of its cost.
TINY_BASE = PretrainConfig(steps=20, batch_size=8, block_size=64, vocab_size=512, n_layer=2, n_embd=32, n_head=4,
                           lr=5e-3, warmup_steps=2, eval_blocks=16)
TINY_CORPUS_FILES = ("argparse.py", "textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                     "queue.py")
TINY_RUN_OVERRIDES = ("train.global_batch=8", "train.micro_batch=4", "train.proposal_min_samples=8",
                      "sampling.max_new_tokens=8", "target.scorer_args.substring=e")


def tiny_grid(tmp_path: Path, *, seeds: tuple[int, ...] = (0, 1)) -> Grid:
    """The miniature grid: TINY_BASE pretrained on TINY_CORPUS_FILES (copied to ``tmp_path/corpus``, the base
    cached in ``tmp_path/models``), one cell (pointwise common), kl and js, 2 steps evaluated at 2
    checkpoints on 16 samples: 2 runs per seed."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for name in TINY_CORPUS_FILES:
        shutil.copy(stdlib_dir() / name, corpus / name)
    return Grid(name="test", sizes={"tiny": TINY_BASE},
                cells=((Path("configs/reproduce/pointwise-common.yaml"), "tiny"),), divergences=("kl", "js"),
                seeds=seeds, steps=2, eval_points=2, eval_samples=16, overrides=TINY_RUN_OVERRIDES,
                base_root=tmp_path / "models", corpus=corpus, prompts=4)


def grid_yaml(grid: Grid) -> str:
    """``grid`` as a ``--grid`` file: every field of the Grid, a size as its PretrainConfig fields that differ
    from the defaults (what a user writes)."""
    def plain(value):
        if isinstance(value, PretrainConfig):
            default = PretrainConfig()
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                    if getattr(value, f.name) != getattr(default, f.name)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return yaml.safe_dump({f.name: plain(getattr(grid, f.name)) for f in dataclasses.fields(grid)}, sort_keys=False)
