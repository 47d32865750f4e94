"""`fdpg-scale train` (the real CLI entry point) with a non-finite ingredient the config cannot express.

argv: MODE then the CLI's train arguments. MODE:
  nan-step-1: registers a test-only reward scorer ``nan_step_1`` that returns NaN for every sample while step 1
              is scored on one rank (its first 2 calls: 2 micro-batches, each stopped at its first, NaN,
              log-score), and the count of "e" afterwards;
  nan-step-1-rank-1: the same scorer on 2 ranks, NaN only on rank 1 during step 1 (its first call: one
              chunk per rank); rank 0 sees finite scores, and both ranks must still skip the step together;
  lr-inf:     sets train.lr to inf after the config is loaded (the loader refuses inf, as it should; this is the
              way to reach the guard's check on weights an update made non-finite).
Exits with the CLI's status.
"""

import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from fdpg_scale.apps import cli  # noqa: E402
from fdpg_scale.targets import tasks  # noqa: E402
from fdpg_scale.training import config  # noqa: E402

mode, argv = sys.argv[1], sys.argv[2:]
calls = {"n": 0}
nan_calls = {"nan-step-1": 2, "nan-step-1-rank-1": 1 if os.environ.get("RANK") == "1" else 0}.get(mode, 0)


def nan_step_1(samples):
    calls["n"] += 1
    if calls["n"] <= nan_calls:
        return torch.full((len(samples.texts),), math.nan)
    return torch.tensor([float(t.count("e")) for t in samples.texts])


if mode.startswith("nan-step-1"):
    tasks.SCORERS["nan_step_1"] = nan_step_1
elif mode == "lr-inf":
    load = config.load_config

    def load_with_inf_lr(*args, **kwargs):
        cfg = load(*args, **kwargs)
        cfg.train.lr = math.inf
        return cfg

    config.load_config = load_with_inf_lr
else:
    sys.exit(f"unknown mode {mode!r}")
sys.exit(cli.main(["train", *argv]))
