"""``fdpg-scale train --nproc-per-node N`` (apps/train_launch.py): the run is checked for N ranks in one process
(a bad input is one line, and torchrun never starts), then torchrun starts the ranks; SIGUSR1 reaches the ranks,
which checkpoint and exit normally, and the exit status is theirs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fdpg_scale import cli
from fdpg_scale.apps import train_launch
from fdpg_scale.errors import EXIT_BAD_INPUT
from tests.harness import CONSOLE_SCRIPT, REPO, SMOKE, cli_env, metrics, one_line, run_cli

ROWS = [  # (id, command-line arguments after `train --config SMOKE`, environment, what the one line says)
    ("global-batch-for-2-ranks", ["--nproc-per-node", "2", "train.global_batch=12"], {},
     "train.global_batch=12 is not a multiple of train.micro_batch × world size = 4 × 2 = 8"),
    ("eval-samples-for-2-ranks", ["--nproc-per-node", "2", "eval.every=1", "eval.samples=12"], {},
     "eval.samples=12 is not a multiple of train.micro_batch × world size = 4 × 2 = 8"),
    ("zero-ranks", ["--nproc-per-node", "0"], {}, "--nproc-per-node must be an integer ≥ 1 (ranks on this node), "
                                                   "got '0'"),
    ("not-a-number", ["--nproc-per-node", "two"], {}, "--nproc-per-node must be an integer ≥ 1"),
    ("already-a-rank", ["--nproc-per-node", "2"], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                    "MASTER_PORT": "29500"},
     "--nproc-per-node starts its own ranks, but RANK is set"),
    ("unknown-key", ["--nproc-per-node", "2", "train.stepz=3"], {}, "train.stepz"),
]


@pytest.mark.parametrize("case, args, env, culprit", ROWS, ids=[r[0] for r in ROWS])
def test_a_bad_input_is_one_line_and_no_rank_starts(case, args, env, culprit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_launch.subprocess, "Popen", lambda *a, **k: pytest.fail("torchrun was started"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    status = cli.main(["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}",
                       f"model.path={tmp_path / 'model'}", *args])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT and culprit in line, line


def test_the_ranks_run_the_same_command_without_the_option():
    cmd = train_launch.rank_command(2, "configs/smoke.yaml", ["train.steps=3"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fdpg_scale.cli",
                       "train", "--config", "configs/smoke.yaml", "train.steps=3"]


def test_children_are_found_in_proc():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        deadline = time.monotonic() + 20
        while not train_launch.children(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        (child,) = train_launch.children(parent.pid)
        assert child != parent.pid
    finally:
        for pid in train_launch.children(parent.pid):
            subprocess.run(["kill", str(pid)])
        parent.wait(timeout=20)


@pytest.mark.slow
def test_the_console_script_prints_one_line_for_a_batch_that_does_not_split_over_2_ranks(tmp_path):
    """As a user runs it: the whole output of the command is that line (no torchrun report), exit status 2."""
    proc = run_cli("train", "--nproc-per-node", "2", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}",
                   "train.global_batch=12", console_script=True, check=False, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT and proc.stdout == "", (proc.stdout, proc.stderr)
    assert "train.global_batch=12 is not a multiple of" in one_line(proc.stderr)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_train_through_the_launch_command_and_stop_on_sigusr1_with_a_checkpoint(tmp_path):
    """The smoke run on 2 ranks via `fdpg-scale train --nproc-per-node 2`; SIGUSR1 to that command after the first
    step reaches the ranks: they checkpoint the step they finished and exit 0, and the command exits 0."""
    out = tmp_path / "run"
    cmd = [str(CONSOLE_SCRIPT), "train", "--nproc-per-node", "2", "--config", str(SMOKE), f"output_dir={out}",
           f"model.path={tmp_path / 'model'}", "train.steps=200", "train.save_every=200", "logging.progress_bar=false",
           "logging.trackers=[]"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-5000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-5000:]
    steps = [r["step"] for r in metrics(out)]
    assert 1 <= len(steps) < 200 and steps == list(range(1, len(steps) + 1)), log[-3000:]
    assert "world 2 (torchrun)" in log and f"stopping at step {steps[-1]} on a stop signal (SIGUSR1)" in log, log[-3000:]
    assert json.loads((out / "checkpoints" / f"step_{steps[-1]:08d}" / "meta.json").read_text())
