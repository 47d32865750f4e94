"""Synthetic finished runs for the statistics, verdict and report tests (no training)."""

from __future__ import annotations

from fdpg_scale.experiments.stats import METRICS

#: KL(p‖π) over three seeds: a tight low group, a tight high group, and a wide one that overlaps both. LOW and
#: HIGH differ by a different amount on each seed, so that a paired test has a spread to measure.
LOW, HIGH, WIDE = [1.0, 1.1, 0.9], [3.0, 3.2, 2.8], [1.0, 2.0, 3.0]


def synthetic_cells(spec: dict) -> list[dict]:
    """Finished runs (``cell.json`` rows): spec {(task, size): {divergence: [KL(p‖π) per seed]}}, or
    {divergence: {metric: [value per seed]}}; the metrics not given are 0.5 everywhere."""
    cells = []
    for (task, size), divs in spec.items():
        for div, given in divs.items():
            given = given if isinstance(given, dict) else {"kl_p_pi": given}
            for seed in range(len(next(iter(given.values())))):
                row = {k: 0.5 for k, _ in METRICS} | {k: v[seed] for k, v in given.items()}
                cells.append({"task": task, "size": size, "divergence": div, "seed": seed, "policy": row,
                              "base": {k: 0.5 for k, _ in METRICS}})
    return cells
