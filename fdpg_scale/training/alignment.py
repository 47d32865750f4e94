"""The per-scorer alignment columns of a step's metrics: E_π of each scorer's quantity, and its mean under q.

A task with one scorer reports ``alignment``, ``alignment_se`` and ``q_alignment_rate`` (the historical names);
a task with several reports ``alignment/<name>``, ``alignment_se/<name>`` and ``q_alignment_rate/<name>`` per
scorer (``column``). The rows travel in the step's gathered batch (``fdpg_scale.core.step.StepBatch.features``).
"""

from __future__ import annotations

import torch

__all__ = ["column", "alignment_columns"]


def column(metric: str, name: str, scorers: int) -> str:
    """The key of ``metric`` (``alignment``, ``alignment_se``, ...) for scorer ``name`` in a task of ``scorers``
    scorers: the bare name when it is the only one, else ``<metric>/<name>``."""
    return metric if scorers == 1 else f"{metric}/{name}"


def alignment_columns(metrics: dict, features: dict[str, torch.Tensor]) -> dict:
    """``metrics`` with each ``phi_mean/<name>`` (and ``_se``) renamed to its alignment column, plus the plain
    mean of each scorer's quantity over the batch ({name: [N]}, drawn from q) as ``q_alignment_rate``."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("phi_mean/", "phi_mean_se/"))}
    for name, values in features.items():
        out[column("alignment", name, len(features))] = metrics[f"phi_mean/{name}"]
        out[column("alignment_se", name, len(features))] = metrics[f"phi_mean_se/{name}"]
        out[column("q_alignment_rate", name, len(features))] = float(values.mean())
    return out
