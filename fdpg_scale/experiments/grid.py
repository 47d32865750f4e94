"""What a reproduction runs: the grid of (task config, base size) cells × divergences × seeds, its budget, and
its YAML file (``fdpg-scale reproduce --grid FILE``), read by the run configs' own typed loader.

The built-in grids (``FULL``, ``QUICK``) and why they are sized as they are: fdpg_scale/experiments/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fdpg_scale.core.divergences import DIVERGENCE_NAMES
from fdpg_scale.errors import ConfigError
from fdpg_scale.models.base_config import DEFAULT_OUT, PretrainConfig
from fdpg_scale.training.config import apply_overrides
from fdpg_scale.training.config_loader import load_dataclass

__all__ = ["Grid", "Run", "QUICK", "FULL", "SIZES", "TASKS", "load_grid", "grid_runs"]

TASKS = Path("configs/reproduce")
#: The base sizes (``PretrainConfig`` beyond the defaults), smallest first; "middle" is the demo's own base
#: (the name is older than the sweep, in which it is the largest).
SIZES = {
    "tiny": PretrainConfig(n_layer=2, n_embd=32, n_head=4),
    "small": PretrainConfig(n_layer=2, n_embd=64, n_head=4),
    "middle": PretrainConfig(),
}


@dataclass(frozen=True, kw_only=True)
class Grid:
    """What one reproduction runs: cells (task config, size) × divergences × seeds, and its budget."""

    name: str
    """``quick`` or ``full`` (or a test's name): written into the report."""
    sizes: dict[str, PretrainConfig]
    """Base size name → its pretraining config (in a file: ``{tiny: {n_layer: 2}}``; null: every default)."""
    cells: tuple[tuple[Path, str], ...]
    """(task config file, size name) pairs; the task's name is the file's stem."""
    divergences: tuple[str, ...] = ("kl", "rkl", "js", "tv")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 60
    """Optimizer steps per run (``train.steps``)."""
    eval_points: int = 3
    """Checkpoints evaluated per run, evenly spaced; the last is the run's result."""
    eval_samples: int = 128
    """Sequences drawn from the policy and from the base at each evaluation."""
    overrides: tuple[str, ...] = ()
    """Further ``key=value`` for every run (tests shrink batches and lengths with it)."""
    base_root: Path = DEFAULT_OUT.parent
    """Where the bases are cached: ``<base_root>/stdlib-gpt2`` (middle) and ``stdlib-gpt2-<size>``."""
    corpus: Path | None = None
    """Pretraining and prompt corpus (default: this Python's standard library)."""
    prompts: int = 32
    """Held-out prompts of a conditional task."""

    def __post_init__(self):
        if not self.cells or not self.divergences or not self.seeds:
            raise ValueError(f"grid {self.name!r}: needs at least one cell, divergence and seed")
        for config, size in self.cells:
            if size not in self.sizes:
                raise ValueError(f"grid {self.name!r}: cell ({config}, {size}) names an unknown size "
                                 f"(known: {', '.join(self.sizes)})")
        for divergence in self.divergences:
            name, _, alpha = divergence.partition(":")
            if name not in DIVERGENCE_NAMES or (name == "alpha") != bool(alpha):
                raise ValueError(f"grid {self.name!r}: divergence {divergence!r} is not one of "
                                 f"{', '.join(DIVERGENCE_NAMES)} (an α-divergence is written alpha:0.5)")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"grid {self.name!r}: seeds must be ≥ 0, got {list(self.seeds)}")
        if not 1 <= self.eval_points <= self.steps or self.steps % self.eval_points:
            raise ValueError(f"grid {self.name!r}: eval_points ({self.eval_points}) must divide steps ({self.steps})")
        if self.eval_samples < 1 or self.prompts < 1:
            raise ValueError(f"grid {self.name!r}: eval_samples ({self.eval_samples}) and prompts ({self.prompts}) "
                             f"must be >= 1")
        # A repeated divergence, seed or (task, size) would send two runs to one directory.
        for key, items in (("divergences", self.divergences), ("seeds", self.seeds),
                           ("cells", [(c.stem, s) for c, s in self.cells])):
            if len(set(items)) < len(items):
                raise ValueError(f"grid {self.name!r}: {key} repeat an entry ({list(items)})")

    def base_dir(self, size: str) -> Path:
        """The cached base of ``size`` (the middle size shares the demo's directory)."""
        return self.base_root / ("stdlib-gpt2" if size == "middle" else f"stdlib-gpt2-{size}")


def _task(name: str) -> Path:
    return TASKS / f"{name}.yaml"


FULL = Grid(name="full", sizes=SIZES,
            cells=tuple((_task(t), "middle") for t in ("pointwise-common", "pointwise-rare", "distributional",
                                                       "reward", "conditional"))
            + tuple((_task("pointwise-common"), s) for s in ("tiny", "small")),
            eval_points=2, eval_samples=256)
QUICK = Grid(name="quick", sizes={"tiny": SIZES["tiny"]},
             cells=((_task("pointwise-common"), "tiny"), (_task("reward"), "tiny")),
             seeds=(0, 1), steps=20, eval_points=2, eval_samples=64)


def load_grid(path: str | Path) -> Grid:
    """The grid of a YAML file (``fdpg-scale reproduce --grid FILE``): a mapping of ``Grid``'s fields, e.g.

        name: mine
        sizes: {tiny: {n_layer: 2, n_embd: 32, steps: 20}}      # size name: PretrainConfig fields
        cells: [[configs/reproduce/reward.yaml, tiny]]            # [task config, size name]
        divergences: [kl, js]
        seeds: [0, 1]

    name, sizes and cells are required; the other keys default as in ``Grid``. Relative paths (task
    configs, base_root, corpus) are relative to the current directory, the project root, as the task
    configs' own paths are. Raises a one-line ConfigError naming the file and the key for an unknown key or
    PretrainConfig field, a wrong type, a missing task config file, an override key that is no run-config
    key or an inconsistent grid: all before anything runs (a SLURM array is submitted)."""
    path = Path(path)
    try:
        grid = load_dataclass(Grid, path, what="grid")
        check_files(grid)
    except ConfigError as err:
        if str(err).startswith(("grid file not found", f"{path}:")):
            raise
        raise ConfigError(f"{path}: {err}") from None
    return grid


def check_files(grid: Grid) -> None:
    """What a grid names outside itself: its task config files and corpus exist, and its overrides' keys are
    run-config keys (their values are checked when each run reads its task config). ConfigError naming the key."""
    for i, (config, _) in enumerate(grid.cells):
        if not config.is_file():
            raise ConfigError(f"cells[{i}]: task config not found: {config} (relative to the current directory, "
                              f"{Path.cwd()})")
    if grid.corpus is not None and not grid.corpus.is_dir():
        raise ConfigError(f"corpus: not a directory: {grid.corpus}")
    try:
        apply_overrides({}, grid.overrides)
    except ConfigError as err:
        raise ConfigError(f"overrides: {err}") from None


@dataclass(frozen=True)
class Run:
    """One f-DPG run of a grid: its index is its SLURM array task id."""

    config: Path
    size: str
    divergence: str
    seed: int

    @property
    def task(self) -> str:
        return self.config.stem

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.task / self.size / self.divergence / f"seed{self.seed}"


def grid_runs(grid: Grid) -> list[Run]:
    """Every run of ``grid`` in a fixed order (cell, then divergence, then seed)."""
    return [Run(config, size, d, s) for config, size in grid.cells for d in grid.divergences for s in grid.seeds]
