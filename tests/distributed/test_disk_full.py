"""A disk that fills during a checkpoint save (a real one: a small tmpfs mounted over ``checkpoints/`` in a mount
namespace of the run's own): the 2-rank run ends with one line saying how much space a checkpoint needs, the
unfinished save is removed, the previous checkpoint and ``latest`` are untouched, and a rerun with space resumes
from it and finishes with every step logged once."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fdpg_scale.distributed.checkpoint import verify_checkpoint
from fdpg_scale.errors import EXIT_BAD_INPUT
from tests.harness import REPO, SMOKE, cli_env, metrics, run_train, torchrun_prefix

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# The smoke run's checkpoint on 2 ranks takes 2.1 MiB: two fit in this, the third save does not.
TMPFS = "5600k"


def _can_mount_tmpfs(where) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_a_rerun_resumes(tiny_gpt2, tmp_path):
    out, kept = tmp_path / "run", tmp_path / "kept"
    (out / "checkpoints").mkdir(parents=True)
    if shutil.which("unshare") is None or not _can_mount_tmpfs(out / "checkpoints"):
        pytest.skip("cannot mount a tmpfs in a user + mount namespace here (unshare -rm)")
    args = ["train", "--config", str(SMOKE), f"output_dir={out}", f"model.path={tiny_gpt2}", "train.steps=8",
            "train.save_every=2", "logging.progress_bar=false", "logging.tensorboard=false"]
    # The mount lives as long as the namespace: what the run left on it is copied out before it goes.
    script = (f'mount -t tmpfs -o size={TMPFS} tmpfs {out}/checkpoints || exit 99; "$@"; status=$?; '
              f'cp -a {out}/checkpoints {kept}; exit $status')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *torchrun_prefix(2), "-m", "fdpg_scale.cli",
                           *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 99), text[-4000:]
    ours = [line for line in text.splitlines() if line.startswith("fdpg-scale:")]
    assert len(ours) == 1, text[-4000:]
    line = ours[0]
    assert re.search(r"cannot save checkpoint step_00000006: no space left on the device \(rank [01], writing ", line)
    assert re.search(r"a checkpoint of this run takes \d+\.\d MiB \(as step_00000004\), \d+\.\d MiB are free", line)
    assert line.endswith("step_00000004 and `latest` are untouched: free space and rerun to resume from "
                         "step_00000004"), line
    assert re.search(rf"exitcode\s*:\s*{EXIT_BAD_INPUT}\b", text), text[-3000:]
    # what the disk held when the run stopped: the two committed checkpoints, `latest` on the newer, no leftover
    assert sorted(p.name for p in kept.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert (kept / "latest").read_text().strip() == "step_00000004"
    assert verify_checkpoint(kept / "step_00000004") is None
    # a rerun with space resumes from it
    (out / "checkpoints").rmdir()
    shutil.move(kept, out / "checkpoints")
    log = run_train(out, "train.steps=8", "train.save_every=2", model=tiny_gpt2, nproc=2)
    assert "resumed at step 4" in log
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
