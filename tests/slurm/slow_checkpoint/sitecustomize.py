"""Test-only injection (tests/slurm): fdpg-scale's checkpoint save takes SLOW_SAVE_SECONDS longer.

tests/slurm puts this folder on PYTHONPATH for one job, so Python imports this module at start-up in that
job's processes only; nothing in the product reads it. The delay applies to the job's first run only
(SLURM_RESTART_COUNT unset or 0), so the requeued run resumes at normal speed. It exists to make a save
outlast torchrun's 30 s shutdown timeout, the case slurm/train.sbatch must survive.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time

SLOW_SAVE_SECONDS = 35.0
_TARGET = "fdpg_scale.distributed.checkpoint"


class _SlowSaveFinder(importlib.abc.MetaPathFinder):
    """Wraps save_checkpoint when the checkpoint module is first imported (no torch import before that)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            save = module.save_checkpoint

            def slow_save(*args, **kwargs):
                print(f"[test injection] checkpoint save delayed by {SLOW_SAVE_SECONDS:g} s", flush=True)
                time.sleep(SLOW_SAVE_SECONDS)
                return save(*args, **kwargs)

            module.save_checkpoint = slow_save

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.meta_path.insert(0, _SlowSaveFinder())
