"""Synthetic finished runs for the statistics, verdict and report tests (no training)."""

from __future__ import annotations

from fdpg_scale.experiments.stats import METRICS

#: KL(p‖π) over three seeds: a tight low group, a tight high group, and a wide one that overlaps both.
LOW, HIGH, WIDE = [1.0, 1.1, 0.9], [3.0, 3.1, 2.9], [1.0, 2.0, 3.0]


def synthetic_cells(spec: dict) -> list[dict]:
    """Finished runs (``cell.json`` rows): spec {(task, size): {divergence: [KL(p‖π) per seed]}}; the other
    metrics are 0.5 everywhere."""
    cells = []
    for (task, size), divs in spec.items():
        for div, values in divs.items():
            for seed, v in enumerate(values):
                row = {k: 0.5 for k, _ in METRICS} | {"kl_p_pi": v}
                cells.append({"task": task, "size": size, "divergence": div, "seed": seed, "policy": row,
                              "base": {k: 0.5 for k, _ in METRICS}})
    return cells
