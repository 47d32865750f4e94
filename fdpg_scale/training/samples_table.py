"""The table of sampled completions (``logging.samples_every``): what a step drew and how f-DPG weighed it.

Every ``logging.samples_every`` optimizer steps, rank 0 writes its own share of the step's global batch
(``train.global_batch / world`` samples: the first rows of the gathered batch, which is in rank order) as one
row per sample, to ``<output_dir>/samples.jsonl`` (one JSON object per sample) and to every tracker. Columns:

- ``step``, ``prompt`` (the context text; "" for an unconditional target), ``completion`` (the decoded text),
  ``tokens`` (generated tokens);
- ``log_pi``, ``log_q``, ``log_base``: log π_θ(x), log q(x), log a(x) of the whole completion;
- ``log_target`` (log P(x), null outside the target's support), ``log_z`` (log Ẑ(c) the weights used);
- ``importance_ratio`` (π/q), ``pseudo_reward`` (r = −f′(π/p)), ``weight`` (the coefficient of log π in the loss);
- ``score/<name>``: each scorer's value (its alignment column).

Non-finite numbers are written as null. A resumed run first drops the rows of steps after the checkpoint it
restarts from, so that every step appears once (as in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fdpg_scale.core.step import StepBatch
from fdpg_scale.targets.samples import Samples

__all__ = ["sample_rows", "SamplesFile"]

_COLUMNS = {"log_pi": "logp_pi", "log_q": "logq", "log_base": "log_base", "log_target": "log_target",
            "log_z": "log_z", "importance_ratio": "importance_ratio", "pseudo_reward": "pseudo_reward",
            "weight": "weight"}


def sample_rows(step: int, samples: list[Samples], batch: StepBatch) -> list[dict[str, Any]]:
    """Rank 0's samples of step ``step`` as table rows (module docstring).

    samples: this rank's scored micro-batches in order (their texts and contexts); batch: the step's global batch
    (``StepResult.batch``, rank order), whose first ``sum(len(s.texts))`` rows are these samples."""
    texts = [t for s in samples for t in s.texts]
    prompts = [c for s in samples for c in (s.contexts if s.contexts is not None else [""] * len(s.texts))]
    n = len(texts)
    if batch.logp_pi.shape[0] < n:
        raise ValueError(f"the global batch has {batch.logp_pi.shape[0]} rows, fewer than this rank's {n} samples")
    numbers = {name: getattr(batch, attr)[:n].tolist() for name, attr in _COLUMNS.items()}
    numbers.update({f"score/{k}": v[:n].tolist() for k, v in batch.features.items()})
    tokens = batch.extras["tokens"][:n].tolist() if "tokens" in batch.extras else [None] * n
    return [{"step": step, "prompt": prompts[i], "completion": texts[i],
             "tokens": None if tokens[i] is None else int(tokens[i]),
             **{k: _finite(v[i]) for k, v in numbers.items()}} for i in range(n)]


class SamplesFile:
    """``<output_dir>/samples.jsonl``, appended to; rows of steps after ``start_step`` are dropped at start."""

    def __init__(self, output_dir: str | Path, *, start_step: int):
        self.path = Path(output_dir) / "samples.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= start_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _step_of(line: str) -> int | None:
    """The step of a samples.jsonl line; None for a blank or torn one (a run killed mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
