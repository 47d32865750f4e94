"""``fdpg-scale reproduce``: the paper's findings (Go et al., ICML 2023) at small scale, with seeds and intervals.

The command only chooses the grid and the stage; the work is in ``fdpg_scale.experiments`` (what runs and
why it is sized so: its package docstring; the grid file: ``experiments.grid``; the runs: ``experiments.runner``;
intervals: ``experiments.stats``; the claims' rules: ``experiments.verdicts``; the report:
``experiments.report``).
"""

from __future__ import annotations

import json
import shlex

from fdpg_scale.experiments.grid import FULL, QUICK, Grid, grid_runs, load_grid
from fdpg_scale.experiments.report import write_results
from fdpg_scale.experiments.runner import default_workers, load_cells, prepare, run_cell, run_grid

__all__ = ["run"]


def _chosen_grid(args) -> Grid:
    """The grid of ``--grid FILE``, else of ``--quick``, else the full one (its task configs checked)."""
    if args.grid is not None:
        return load_grid(args.grid)   # checks its own task configs
    grid = QUICK if args.quick else FULL
    for config, _ in grid.cells:
        if not config.is_file():
            raise FileNotFoundError(f"reproduce: task config not found: {config} (run from the project root)")
    return grid


def run(args) -> int:
    """``fdpg-scale reproduce [--quick | --grid FILE] [--out DIR] [--workers N] [--count | --prepare | --cell I |
    --report]``
    (arguments parsed by ``fdpg_scale.apps.cli``)."""
    grid = _chosen_grid(args)
    command = "fdpg-scale " + shlex.join(args.argv)
    if args.count:
        print(len(grid_runs(grid)))
    elif args.prepare:
        prepare(grid, args.out)
    elif args.cell is not None:
        run_cell(grid, args.out, args.cell)
    elif args.report:
        bases = json.loads((args.out / "bases.json").read_text())
        cells = load_cells(grid, args.out)
        print(f"report: {write_results(args.out, grid, bases, cells, command=command, seconds=None)}")
    else:
        grid_args = ["--grid", str(args.grid)] if args.grid is not None else ["--quick"] if args.quick else []
        workers = default_workers() if args.workers is None else args.workers
        print(f"report: {run_grid(grid, args.out, command=command, workers=workers, grid_args=grid_args)}")
    return 0
