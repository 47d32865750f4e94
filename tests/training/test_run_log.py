"""RunLogger (training/run_log.py): metrics.jsonl rows, the summary line, resume truncation, rank > 0 silence."""

from __future__ import annotations

import json
import math

import torch

from fdpg_scale.training.run_log import RunLogger


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logger(out, **kw) -> RunLogger:
    return RunLogger(out, enabled=kw.pop("enabled", True), total_steps=kw.pop("total_steps", 5),
                     progress_bar=kw.pop("progress_bar", False), **kw)


def test_one_json_row_per_step_with_plain_numbers_and_a_summary_line(tmp_path, capsys):
    log = logger(tmp_path)
    log.log(1, {"loss": torch.tensor(0.25), "kl_p_pi": 1.5, "alignment/fn": 0.125, "log_z": None,
                "proposal_version": torch.tensor(2)})
    log.log(2, {"loss": float("nan"), "skipped": 1})
    log.close()
    first, second = rows(tmp_path)
    assert first == {"step": 1, "loss": 0.25, "kl_p_pi": 1.5, "alignment/fn": 0.125, "log_z": None,
                     "proposal_version": 2}
    assert isinstance(first["proposal_version"], int)          # a tensor's .item(), not a float of it
    assert second["step"] == 2 and math.isnan(second["loss"])   # a skipped step's NaN is written as NaN
    lines = capsys.readouterr().out.splitlines()
    # the summary names the fixed keys in order, then one alignment/<name> per scorer; None is left out
    assert lines[0] == "step 1 | loss 0.25 | kl_p_pi 1.5 | proposal_version 2 | alignment/fn 0.125"
    assert lines[1] == "step 2 | loss nan"


def test_summary_every_n_steps(tmp_path, capsys):
    log = logger(tmp_path, summary_every=3)
    for step in range(1, 7):
        log.log(step, {"loss": float(step)})
    log.close()
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == ["step 3", "step 6"]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_resumed_run_drops_the_rows_written_after_its_checkpoint(tmp_path):
    log = logger(tmp_path)
    for step in range(1, 5):
        log.log(step, {"loss": float(step)})
    log.close()
    resumed = logger(tmp_path, start_step=2)                   # the checkpoint it resumes from is step 2's
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_line_cut_by_a_kill_is_dropped_on_resume_and_its_step_written_once(tmp_path, capsys):
    log = logger(tmp_path)
    for step in range(1, 5):
        log.log(step, {"loss": float(step)})
    log.close()
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[:len(text) - 12])     # step 4's line cut mid-write, no newline
    capsys.readouterr()
    resumed = logger(tmp_path, start_step=3)   # the checkpoint is step 3's: the save comes after a step's line
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert path.read_text().endswith("\n")
    assert [(r["step"], r["loss"]) for r in rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("fdpg-scale:") and "line 4 is not a whole record" in said[0], said


def test_ranks_other_than_0_write_and_print_nothing(tmp_path, capsys):
    log = logger(tmp_path / "run", enabled=False)
    log.log(1, {"loss": 1.0})
    log.message("hello")
    log.close()
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


def test_tensorboard_gets_the_finite_scalars(tmp_path):
    from fdpg_scale.training.trackers import TensorBoardTracker

    log = logger(tmp_path, trackers=[TensorBoardTracker(tmp_path / "tensorboard", start_step=0)])
    log.log(1, {"loss": 0.5, "kl_p_pi": float("inf"), "log_z": None})
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]


def test_messages_go_through_the_progress_bar_when_there_is_one(tmp_path, capsys):
    log = logger(tmp_path, progress_bar=True, total_steps=2)
    log.message("fitted λ")
    log.log(1, {"loss": 0.5})
    log.close()
    out = capsys.readouterr()
    assert "fitted λ" in out.out and "step 1 | loss 0.5" in out.out
    assert "f-DPG" in out.err                                     # tqdm draws on stderr
