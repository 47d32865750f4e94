"""Shared test helpers: verbose allclose and tolerances by dtype."""

from __future__ import annotations

import torch

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
