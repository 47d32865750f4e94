"""Checkpoint pointer logic (no processes) and a save killed halfway (SIGKILL) leaving the previous one loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from fdpg_scale.distributed.checkpoint import CheckpointMismatchError, check_fingerprint, find_latest, model_config_hash
from fdpg_scale.models.tiny import build_tiny_model_dir
from tests.harness import REPO, run_workers, torchrun_cmd, worker_env


def _fake(ckdir, step, fingerprint=None):
    d = ckdir / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint or {}}))
    return d


def test_find_latest_follows_pointer_and_survives_a_dangling_one(tmp_path):
    ck = tmp_path / "checkpoints"
    assert find_latest(tmp_path) is None
    a, b = _fake(ck, 3), _fake(ck, 10)
    (ck / ".tmp-step_00000011").mkdir()  # a save killed before its commit: never chosen
    (ck / "step_00000012").mkdir()  # no meta.json: not a checkpoint
    assert find_latest(tmp_path) == b
    (ck / "latest").write_text("step_00000003\n")
    assert find_latest(tmp_path) == a  # the pointer wins while it is valid
    (ck / "latest").write_text("step_00000007\n")
    assert find_latest(tmp_path) == b  # dangling pointer: newest complete directory


def test_fingerprint_check_names_every_difference(tmp_path):
    d = _fake(tmp_path / "checkpoints", 1, {"model": "abc", "divergence": "alpha", "alpha": 0.5})
    check_fingerprint(d, {"model": "abc", "divergence": "alpha", "alpha": 0.5})
    with pytest.raises(CheckpointMismatchError, match=r"alpha=0.5 there, 0.3 here; divergence='alpha' there, "
                                                       r"'js' here"):
        check_fingerprint(d, {"model": "abc", "divergence": "js", "alpha": 0.3})


def test_model_config_hash_ignores_key_order_and_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"x": 1, "y": 2, "_name_or_path": "/p"}')
    (tmp_path / "b" / "config.json").write_text('{"y": 2, "x": 1}')
    assert model_config_hash(tmp_path / "a") == model_config_hash(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    model = build_tiny_model_dir(tmp_path / "model", "gpt2")
    proc = subprocess.Popen(torchrun_cmd("ckpt_worker.py", 1, "save", tmp_path, model), env=worker_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "in_commit").exists():
            assert proc.poll() is None, f"save worker exited early:\n{proc.stdout.read().decode()[-5000:]}"
            assert time.time() < deadline, "save worker never reached the commit"
            time.sleep(0.2)
        assert (tmp_path / "run" / "checkpoints" / ".tmp-step_00000002" / "policy").is_dir()  # mid-save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group (torchrun + its rank)
        proc.wait()
    assert find_latest(tmp_path / "run").name == "step_00000001"
    run_workers("ckpt_worker.py", 1, "load", str(tmp_path), str(model))
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert loaded["ckpt"].endswith("step_00000001") and loaded["state"] == {"step": 1, "log_z": 0.25}
    assert torch.equal(loaded["rand"], saved["rand"])  # RNG restored to the moment of the save
    for name, p in saved["params"].items():
        assert torch.equal(loaded["params"][name], p), name


def test_settings_added_later_resume_at_their_default(tmp_path):
    """A checkpoint written before a target setting existed resumes when the run leaves it at its default, and is
    refused, by name, when the run changes it."""
    d = _fake(tmp_path / "checkpoints", 1, {"model": "abc", "target": {"kind": "pointwise", "beta": 1.0}})
    defaults = {"target": {"beta": 1.0, "split": "train", "chat_template": None}}
    check_fingerprint(d, {"model": "abc", "target": {"kind": "pointwise", "beta": 1.0, "split": "train",
                                                     "chat_template": None}}, defaults)
    with pytest.raises(CheckpointMismatchError, match=r"target=.*'split': 'train'.* there, .*'split': 'test'.* here"):
        check_fingerprint(d, {"model": "abc", "target": {"kind": "pointwise", "beta": 1.0, "split": "test"}},
                          defaults)
    with pytest.raises(CheckpointMismatchError, match="target="):   # without defaults a new key is a difference
        check_fingerprint(d, {"model": "abc", "target": {"kind": "pointwise", "beta": 1.0, "split": "train"}})


def test_strays_in_checkpoints_are_ignored_with_a_warning_and_a_dangling_latest_falls_back(tmp_path, capsys):
    from fdpg_scale.distributed.checkpoint import find_intact

    ck = tmp_path / "checkpoints"
    _fake(ck, 2)
    newest = _fake(ck, 4)
    (ck / "notes.txt").write_text("copied by hand")
    (ck / "backup").mkdir()
    (ck / "step_00000009").write_text("a file, not a checkpoint")
    (ck / "latest").write_text("step_00000099\n")     # names a directory that is gone
    capsys.readouterr()
    assert find_intact(tmp_path) == newest
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 4, warnings
    for name in ("notes.txt", "backup", "step_00000009"):
        assert any(f"{ck / name} is not a checkpoint (fdpg-scale did not write it): ignored" in w for w in warnings)
    assert any("latest names 'step_00000099', which is not a checkpoint here" in w for w in warnings)
    assert (ck / "notes.txt").exists() and (ck / "backup").is_dir()   # left alone
    assert (ck / "latest").read_text() == "step_00000004\n"           # repointed at what the run resumes from
    assert find_intact(tmp_path) == newest
    assert not [line for line in capsys.readouterr().out.splitlines() if "latest" in line]
