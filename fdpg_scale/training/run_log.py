"""What a run reports: ``metrics.jsonl`` (one JSON object per optimizer step), the same numbers to the experiment
trackers of ``logging.trackers`` (TensorBoard, W&B, MLflow, trackio: training/trackers.py), the table of sampled
completions to ``samples.jsonl`` and the trackers (training/samples_table.py), a progress bar and a one-line
summary every N steps. Rank 0 writes; other ranks get a logger that does nothing.

``metrics.jsonl`` is appended to, so a resumed run continues the same file; on resume the lines of steps after
the resumed step (written after the checkpoint the run restarts from) are dropped first, and so is a line a kill
cut short (a torn write), so every step appears exactly once, each line whole.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from fdpg_scale.training.samples_table import SamplesFile
from fdpg_scale.training.trackers import Tracker

__all__ = ["RunLogger"]


class RunLogger:
    """Per-step metrics sink of one run.

    Args:
        output_dir: the run directory; ``metrics.jsonl`` and ``samples.jsonl`` go there.
        enabled: False on every rank but 0 (then every method is a no-op).
        total_steps / start_step: for the progress bar; ``start_step`` also truncates stale lines.
        summary_every: print a one-line summary every this many steps.
        trackers: where each row's finite numbers and each samples table also go (``trackers.build_trackers``);
            closed by ``close``.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 summary_every: int = 1, trackers: Sequence[Tracker] = (), progress_bar: bool = True):
        self.enabled = enabled
        self.summary_every = summary_every
        self.trackers = list(trackers)
        self._bar = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_lines_from(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._samples = SamplesFile(output_dir, start_step=start_step)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="f-DPG", unit="step", dynamic_ncols=True,
                             leave=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of optimizer step ``step`` (1-based: the step just completed)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self.trackers:
            numbers = {key: value for key, value in record.items()
                       if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
            for tracker in self.trackers:
                tracker.log_metrics(step, numbers)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=_short(record.get("loss")), kl_p_pi=_short(record.get("kl_p_pi")))
        if step % self.summary_every == 0:
            self.message(_summary_line(record))

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The table of sampled completions of step ``step`` (``samples_table.sample_rows``): appended to
        ``samples.jsonl`` and sent to every tracker."""
        if not self.enabled or not rows:
            return
        self._samples.write(rows)
        for tracker in self.trackers:
            tracker.log_samples(step, rows)

    def message(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        for tracker in self.trackers:
            tracker.close()
        if self._bar is not None:
            self._bar.close()

    def _drop_lines_from(self, start_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                step = json.loads(line)["step"] if line.strip() else None
            except (ValueError, KeyError, TypeError):
                # A kill while this line was being written leaves it cut short: it belongs to a step after the
                # checkpoint (the save comes after the step's line), so the resumed run writes it again.
                print(f"fdpg-scale: {self.path} line {number} is not a whole record (a write cut short by a "
                      f"kill?): dropped, its step is logged again", flush=True)
                continue
            if step is not None and step <= start_step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


_SUMMARY_KEYS = ("loss", "log_z", "kl_p_pi", "kl_pi_a", "alignment", "ess", "proposal_version", "tokens_per_s")


def _summary_line(record: dict) -> str:
    parts = [f"step {record['step']}"]
    # A target of several scorers has one alignment/<name> column per scorer instead of "alignment".
    keys = [*_SUMMARY_KEYS, *[k for k in record if k.startswith("alignment/")]]
    for key in keys:
        if key in record and isinstance(record[key], (int, float)):
            parts.append(f"{key} {record[key]:.4g}")
    return " | ".join(parts)


def _short(value) -> str:
    """A metric for the progress bar: 3 significant digits, or "-" when the step has none (a skipped step)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def _plain(value):
    """JSON-friendly scalar: tensors and numpy numbers become Python floats/ints."""
    if hasattr(value, "item"):
        value = value.item()
    return value
