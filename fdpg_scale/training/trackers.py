"""Experiment trackers (``logging.trackers``): where a run's per-step metrics and its table of sampled completions
go besides ``metrics.jsonl`` and ``samples.jsonl``. One adapter per tracker behind one interface, ``Tracker``:

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (scalars; the samples table as a text summary);
  installed with fdpg-scale itself;
- ``wandb``: Weights & Biases in ``<output_dir>/wandb``, in ``logging.wandb_mode`` (``offline`` by default:
  nothing leaves the machine; upload later with ``wandb sync <output_dir>/wandb/offline-run-*``); the samples
  table as a ``wandb.Table``. Extra: ``pip install 'fdpg-scale[wandb]'``;
- ``mlflow``: MLflow's tracking client writing to ``logging.mlflow_tracking_uri``, by default a SQLite store
  ``<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts`` (``mlflow ui --backend-store-uri
  sqlite:///<output_dir>/mlflow.db``; MLflow 3 no longer creates file stores); the samples table with
  ``mlflow.log_table`` as ``samples/step_<N>.json``. Extra: ``pip install 'fdpg-scale[mlflow]'``;
- ``trackio``: Hugging Face's local-first tracker, in its own local database (``TRACKIO_DIR``, by default in
  the Hugging Face cache; ``trackio show`` opens it); the samples table as a ``trackio.Table``. Extra:
  ``pip install 'fdpg-scale[trackio]'``.

A tracker that is named but not installed is a one-line ConfigError naming the extra, raised by the pre-start
checks (``check_installed``, called from ``training/preflight.py``), never a silent fallback. A resumed run
(same ``output_dir``) continues the same W&B and MLflow run: their run ids are kept in
``<output_dir>/trackers.json``. Only rank 0 builds trackers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Protocol

from fdpg_scale.errors import ConfigError

__all__ = ["Tracker", "TRACKERS", "check_installed", "build_trackers", "TensorBoardTracker", "WandbTracker",
           "MLflowTracker", "TrackioTracker"]

#: tracker name -> the module it imports (None: installed with fdpg-scale itself).
TRACKERS: dict[str, str | None] = {"tensorboard": None, "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class Tracker(Protocol):
    """What the run log (training/run_log.py) calls on every tracker, on rank 0."""

    name: str

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The finite numbers of optimizer step ``step``'s ``metrics.jsonl`` row (without ``step``)."""

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The table of sampled completions of step ``step`` (``training/samples_table.py``: one dict per sample,
        the same keys in every row)."""

    def close(self) -> None:
        """Flush and finish the tracker's run."""


def check_installed(names: list[str]) -> None:
    """One-line ConfigError for the first tracker of ``names`` whose package is not installed (its extra)."""
    for name in names:
        module = TRACKERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.trackers names {name!r}, but {module} is not installed: "
                              f"pip install 'fdpg-scale[{name}]'")


def build_trackers(names: list[str], *, output_dir: str | Path, start_step: int, config: dict, project: str,
                   run_name: str | None, wandb_mode: str, mlflow_tracking_uri: str | None) -> list[Tracker]:
    """The trackers ``names`` for the run in ``output_dir`` resumed at ``start_step`` (0: fresh); ``config`` is the
    run config as a plain mapping (recorded as the tracker run's parameters)."""
    check_installed(names)
    out = Path(output_dir)
    name = run_name or out.resolve().name
    ids = _RunIds(out / "trackers.json")
    made: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            made.append(TensorBoardTracker(out / "tensorboard", start_step=start_step))
        elif tracker == "wandb":
            made.append(WandbTracker(out, project=project, name=name, mode=wandb_mode, config=config, ids=ids))
        elif tracker == "mlflow":
            uri = mlflow_tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
            made.append(MLflowTracker(uri, artifact_location=(out / "mlartifacts").resolve().as_uri(), project=project,
                                      name=name, config=config, ids=ids))
        elif tracker == "trackio":
            made.append(TrackioTracker(project=project, name=name, config=config))
    return made


class TensorBoardTracker:
    """TensorBoard event files; a resumed run purges the events at or after ``start_step`` (they belong to the
    steps it repeats)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, *, start_step: int):
        # Imported here: tensorboard pulls in protobuf/grpc, which ranks > 0 never need.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text("samples", _markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<output_dir>/wandb`` with a fixed id (resumed with the run), in ``mode`` (offline/online)."""

    name = "wandb"

    def __init__(self, output_dir: Path, *, project: str, name: str, mode: str, config: dict, ids: "_RunIds"):
        import wandb

        self.wandb = wandb
        run_id = ids.get("wandb") or _stable_id(output_dir)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode, config=config,
                              dir=str(output_dir))
        ids.set("wandb", run_id)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.run.log({"samples": _table(self.wandb, rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run in experiment ``project`` at ``tracking_uri``; the run config is logged as flat parameters
    once, when the run is created (MLflow refuses to change a parameter, and a resume may change train.steps)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, *, artifact_location: str, project: str, name: str, config: dict,
                 ids: "_RunIds"):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if mlflow.get_experiment_by_name(project) is None:
            # Artifacts (the samples tables) beside the store, not in the current directory (MLflow's default).
            mlflow.create_experiment(project, artifact_location=artifact_location)
        mlflow.set_experiment(project)
        run_id = ids.get("mlflow")
        self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=name)
        if run_id is None:
            mlflow.log_params({k: _param(v) for k, v in _flatten(config).items()})
            ids.set("mlflow", self.run.info.run_id)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({_MLFLOW_BAD.sub("_", k): v for k, v in metrics.items()}, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.mlflow.log_table({c: [r[c] for r in rows] for c in rows[0]}, artifact_file=f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker:
    """A trackio run in project ``project``, in trackio's local database (continued by name on resume)."""

    name = "trackio"

    def __init__(self, *, project: str, name: str, config: dict):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=name, config=config, resume="allow")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.trackio.log({"samples": _table(self.trackio, rows)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _table(library, rows: list[dict[str, Any]]):
    """``library.Table`` (W&B's, or trackio's, which copies its API) of ``rows``: one column per key of the first."""
    columns = list(rows[0])
    return library.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])


# MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/' (a scorer's name may hold other characters).
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class _RunIds:
    """``<output_dir>/trackers.json``: {tracker: its run id}, so that a resumed run continues the same tracker run."""

    def __init__(self, path: Path):
        self.path = path
        self.ids = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, tracker: str) -> str | None:
        return self.ids.get(tracker)

    def set(self, tracker: str, run_id: str) -> None:
        self.ids[tracker] = run_id
        self.path.write_text(json.dumps(self.ids, indent=1) + "\n")


def _stable_id(output_dir: Path) -> str:
    """A W&B run id derived from the run directory (W&B ids: letters and digits)."""
    return hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param(value: Any) -> str:
    # MLflow keeps parameters as strings of at most 6000 characters.
    return json.dumps(value)[:6000] if not isinstance(value, str) else value[:6000]


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders Markdown)."""
    columns = list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", "↵")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
