"""Damaged checkpoints: each kind of file truncated, none intact, rotation leftovers, a planted pickle.

One real 1-rank run (`fdpg-scale train`, 2 steps, a checkpoint after each: ~40 s) makes the checkpoints;
the checks on copies of it run in-process (``find_intact`` needs no process group on one rank), and one
more real run resumes past a damaged latest checkpoint and redoes its step exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fdpg_scale.distributed.checkpoint import find_intact
from fdpg_scale.distributed.checkpoint_files import file_record, load_plain
from fdpg_scale.errors import CheckpointError
from tests.harness import SMOKE, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEP1, STEP2 = "step_00000001", "step_00000002"


def _train(out: Path, model: Path, steps: int) -> subprocess.CompletedProcess:
    return run_cli("train", "--config", str(SMOKE), f"output_dir={out}", f"model.path={model}", f"train.steps={steps}",
                   "train.save_every=1", "train.keep_checkpoints=3", "logging.progress_bar=false",
                   "logging.tensorboard=false", check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    """A run directory with intact checkpoints after steps 1 and 2 (``run/``; the model it used is tiny_gpt2)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = _train(root / "run", tiny_gpt2, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _copy(run: Path, tmp: Path) -> Path:
    shutil.copytree(run / "run", tmp / "run")
    return tmp / "run"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {  # kind of file -> how it is damaged
    "optimizer states, truncated": ("policy/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", _truncate),
    "model states, empty": ("policy/ds/zero_pp_rank_0_mp_rank_00_model_states.pt", lambda p: p.write_bytes(b"")),
    "proposal shard, truncated": ("proposal/rank_00000.pt", _truncate),
    "rng state, truncated": ("rng/rank_00000.pt", _truncate),
    "trainer state, truncated": ("trainer_state.pt", _truncate),
    "hf config, truncated": ("hf/config.json", _truncate),
    "tokenizer, deleted": ("hf/tokenizer.json", Path.unlink),
    "meta.json, truncated": ("meta.json", _truncate),
    "same size, one byte changed": ("trainer_state.pt",
                                    lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1]))),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(kind, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    name, damage = DAMAGE[kind]
    damage(out / "checkpoints" / STEP2 / name)
    capsys.readouterr()
    assert find_intact(out) == out / "checkpoints" / STEP1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and STEP2 in lines[0] and "damaged" in lines[0], lines
    assert (name if name != "meta.json" else "meta.json") in lines[0], lines[0]
    assert not (out / "checkpoints" / STEP2).exists() and (out / "checkpoints" / f".damaged-{STEP2}").is_dir()
    assert find_intact(out) == out / "checkpoints" / STEP1  # a second look agrees, and says nothing more
    assert not capsys.readouterr().out.strip()


def test_export_refuses_a_damaged_checkpoint_by_name_and_exports_an_intact_one(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from fdpg_scale.distributed.export import export_checkpoint, export_latest

    out = _copy(run, tmp_path)
    ckpt = out / "checkpoints" / STEP2
    _truncate(ckpt / "policy/ds/zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as info:
        export_latest(out, tmp_path / "exported")            # what `fdpg-scale export` and `eval` call
    text = str(info.value)
    assert "\n" not in text and f"{STEP2} is damaged" in text and "model_states.pt" in text, text
    assert not (tmp_path / "exported").exists() and ckpt.is_dir()   # nothing written, nothing renamed
    export_checkpoint(out / "checkpoints" / STEP1, tmp_path / "step1")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "step1") is not None


def test_no_intact_checkpoint_stops_with_one_line_listing_them(run, tmp_path):
    out = _copy(run, tmp_path)
    _truncate(out / "checkpoints" / STEP2 / "trainer_state.pt")
    (out / "checkpoints" / STEP1 / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        find_intact(out)
    text = str(info.value)
    assert "\n" not in text and "no intact checkpoint" in text
    assert f"{STEP2}: trainer_state.pt has" in text and f"{STEP1}: rng/rank_00000.pt is missing" in text


def test_a_checkpoint_from_before_checksums_is_loaded_unverified_and_said_so(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    meta_file = out / "checkpoints" / STEP2 / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]  # what an older fdpg-scale wrote
    meta_file.write_text(json.dumps(meta))
    capsys.readouterr()
    assert find_intact(out) == out / "checkpoints" / STEP2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "predates file checksums" in lines[0], lines


def test_leftovers_of_a_killed_rotation_are_removed(run, tmp_path):
    out = _copy(run, tmp_path)
    (out / "checkpoints" / "step_00000009").mkdir()  # killed rotation (older versions): no meta.json
    half = out / "checkpoints" / "step_00000000"
    half.mkdir()
    (half / "policy").mkdir()
    assert find_intact(out) == out / "checkpoints" / STEP2
    assert not (out / "checkpoints" / "step_00000009").exists() and not half.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_in_one_line(run, tmp_path):
    out = _copy(run, tmp_path)
    ckpt = out / "checkpoints" / STEP2
    marker = tmp_path / "pwned"
    target = ckpt / "rng" / "rank_00000.pt"
    torch.save({"python": _Payload(marker)}, target)
    # The attacker also fixes the checksum: the weights-only load is what must refuse it.
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["rng/rank_00000.pt"] = file_record(target)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert find_intact(out) == ckpt
    with pytest.raises(CheckpointError) as info:
        load_plain(target)
    assert "\n" not in str(info.value) and "refused to load" in str(info.value) and str(target) in str(info.value)
    assert not marker.exists()
    torch.load(target, weights_only=False)  # what the old loader did: it runs the payload (the file is hostile)
    assert marker.exists()


def test_the_project_files_hold_only_tensors_and_plain_containers(run):
    ckpt = run / "run" / "checkpoints" / STEP2
    for name in ("rng/rank_00000.pt", "trainer_state.pt", "proposal/rank_00000.pt"):
        assert isinstance(load_plain(ckpt / name), dict), name


def test_a_run_resumes_past_a_damaged_latest_checkpoint_and_redoes_its_step(run, tiny_gpt2, tmp_path):
    out = _copy(run, tmp_path)
    _truncate(out / "checkpoints" / STEP2 / "policy" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = _train(out, tiny_gpt2, 3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert log.count("is damaged") == 1 and "resumed at step 1" in log, log[-3000:]
    straight = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("loss", "log_z", "kl_p_pi"):  # step 2 redone from step 1's checkpoint: the same numbers
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-9), key


def test_a_checkpoint_from_before_a_target_setting_existed_resumes(run, tiny_gpt2, tmp_path):
    """Upgrading the package mid-run: the stored fingerprint lacks target keys added since (here every key a
    default covers), and the run, which leaves them at their defaults, resumes from it."""
    out = _copy(run, tmp_path)
    meta_path = out / "checkpoints" / STEP2 / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"]["target"] = {k: v for k, v in meta["fingerprint"]["target"].items()
                                     if k in ("kind", "scorer", "scorer_args")}
    meta_path.write_text(json.dumps(meta))
    proc = _train(out, tiny_gpt2, 3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed at step 2" in proc.stdout + proc.stderr
