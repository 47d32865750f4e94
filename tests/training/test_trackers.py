"""Experiment trackers (``logging.trackers``: training/trackers.py) and the table of sampled completions
(``logging.samples_every``: training/samples_table.py), through ``fdpg-scale train``.

The tracker runs are read back from what each tracker wrote under the run directory, offline: TensorBoard's
event files, W&B's offline run (its run file and the table's JSON), MLflow's SQLite store and artifacts. W&B and
MLflow are the ``wandb`` and ``mlflow`` extras, which scripts/setup.sh installs; trackio is not installed here
(its pinned dependencies clash with the lock), so only its missing-extra error is tested.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fdpg_scale import cli
from fdpg_scale.core.step import StepBatch
from fdpg_scale.errors import EXIT_BAD_INPUT
from fdpg_scale.targets.samples import Samples
from fdpg_scale.training import loop
from fdpg_scale.training.preflight import preflight
from fdpg_scale.training.samples_table import sample_rows
from tests.harness import SMOKE, metrics, one_line, run_train

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow", "trackio")}


# ------------------------------------------------------------------------------------------ bad values
ROWS = [
    ("unknown-tracker", ["logging.trackers=[tensorboard, neptune]"],
     "'logging.trackers[]' must be one of tensorboard, wandb, mlflow, trackio; got 'neptune'"),
    ("tracker-twice", ["logging.trackers=[wandb, wandb]"], "logging.trackers names a tracker twice"),
    ("trackers-not-a-list", ["logging.trackers=wandb"], "logging.trackers"),
    ("samples-every-negative", ["logging.samples_every=-1"], "logging.samples_every must be ≥ 0"),
    ("samples-every-not-int", ["logging.samples_every=often"], "logging.samples_every"),
    ("wandb-mode", ["logging.wandb_mode=cloud"], "'logging.wandb_mode' must be one of offline, online"),
    ("project-empty", ["logging.project=' '"], "logging.project must not be empty"),
]


@pytest.mark.parametrize("case, args, culprit", ROWS, ids=[r[0] for r in ROWS])
def test_bad_tracker_settings_are_one_line(case, args, culprit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the run started"))
    status = cli.main(["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}", *args])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT and culprit in line, line


@pytest.mark.skipif(HAVE["trackio"], reason="trackio is installed here")
def test_a_tracker_that_is_not_installed_names_its_extra_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "train", lambda cfg: preflight(cfg, world_size=1))
    status = cli.main(["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}",
                       f"model.path={tmp_path / 'model'}", "logging.trackers=[tensorboard, trackio]"])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT, line
    assert "logging.trackers names 'trackio', but trackio is not installed: pip install 'fdpg-scale[trackio]'" in line
    assert not (tmp_path / "model").exists()      # refused before the model is built


# --------------------------------------------------------------------------------------- samples table
def test_the_samples_table_is_this_ranks_rows_of_the_global_batch():
    """Rank 0's samples are the first rows of the gathered batch; −inf (outside the support) becomes null."""
    n_global = 6
    col = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    batch = StepBatch(logp_pi=col(-1, -2, -3, -4, -5, -6), logp_sampling=torch.zeros(n_global),
                      logq=col(-1.5, -2.5, -3.5, 0, 0, 0), log_target=col(-0.5, -math.inf, -1.5, 0, 0, 0),
                      log_base=col(-7, -8, -9, 0, 0, 0), context_ids=torch.tensor([1, 0, 1, 0, 0, 0]),
                      log_z=col(0.1, 0.2, 0.1, 0, 0, 0), baseline=torch.zeros(n_global),
                      weight=col(0.5, 0.25, 2, 9, 9, 9), pseudo_reward=col(1, 2, 3, 9, 9, 9),
                      importance_ratio=col(0.5, 1, 2, 9, 9, 9), features={"contains": col(1, 0, 1, 9, 9, 9)},
                      extras={"tokens": col(3, 5, 2, 9, 9, 9)})
    mine = [Samples(token_ids=torch.zeros(2, 1, dtype=torch.long), mask=torch.ones(2, 1), texts=["ab", "cd"],
                    context_ids=torch.tensor([1, 0]), contexts=["p1", "p0"]),
            Samples(token_ids=torch.zeros(1, 1, dtype=torch.long), mask=torch.ones(1, 1), texts=["ef"],
                    context_ids=torch.tensor([1]), contexts=["p1"])]
    rows = sample_rows(4, mine, batch)
    assert [(r["prompt"], r["completion"], r["tokens"]) for r in rows] == [("p1", "ab", 3), ("p0", "cd", 5),
                                                                          ("p1", "ef", 2)]
    assert rows[1] == {"step": 4, "prompt": "p0", "completion": "cd", "tokens": 5, "log_pi": -2.0, "log_q": -2.5,
                       "log_base": -8.0, "log_target": None, "log_z": 0.2, "importance_ratio": 1.0,
                       "pseudo_reward": 2.0, "weight": 0.25, "score/contains": 0.0}
    unconditional = [Samples(token_ids=torch.zeros(1, 1, dtype=torch.long), mask=torch.ones(1, 1), texts=["x"])]
    assert sample_rows(1, unconditional, batch)[0]["prompt"] == ""


# ------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_train_logs_metrics_and_samples_to_every_tracker_offline(tmp_path):
    """`fdpg-scale train` with TensorBoard, W&B (offline) and MLflow (its SQLite store under the run directory):
    each holds every step's scalars and the samples tables; samples.jsonl holds every sampled completion of the
    steps logging.samples_every picks, and a resumed run continues the same tracker runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = ["tensorboard", *[t for t in ("wandb", "mlflow") if HAVE[t]]]
    out, model = tmp_path / "run", tmp_path / "model"
    common = ("train.save_every=2", f"logging.trackers=[{', '.join(trackers)}]", "logging.samples_every=2")
    run_train(out, "train.steps=2", *common, model=model)
    rows = metrics(out)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2] * 8           # global batch 8 on one rank; step 2 only
    assert all(r["completion"] is not None and r["prompt"] == "" and r["log_pi"] < 0 for r in samples)
    assert {"log_q", "log_target", "importance_ratio", "pseudo_reward", "weight", "score/contains"} <= samples[0].keys()

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])
    assert [e.step for e in events.Tensors("samples/text_summary")] == [2]

    if HAVE["wandb"]:
        (run_dir,) = (out / "wandb").glob("offline-run-*")
        (table,) = (run_dir / "files" / "media" / "table").glob("samples_2_*.table.json")
        data = json.loads(table.read_text())
        assert [dict(zip(data["columns"], row)) for row in data["data"]] == samples
        history = next(run_dir.glob("*.wandb")).read_bytes()   # the offline run's records (protobuf)
        assert b"kl_p_pi" in history and b"tokens_per_s" in history

    run_train(out, "train.steps=4", *common, model=model)      # resumes at step 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2] * 8 + [4] * 8
    if HAVE["mlflow"]:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
        (run,) = mlflow.search_runs(experiment_names=["fdpg-scale"], output_format="list")   # one run, resumed
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
        assert run.data.params["train.global_batch"] == "8" and run.info.run_name == "run"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_000002.json",
                                                                                     "samples/step_000004.json"]
