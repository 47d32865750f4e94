"""The project's slurm/ scripts submitted to a real SLURM cluster started on this machine (CPU overrides).

``slurm/testing/start_cluster.sh`` starts munge, slurmctld and two slurmd (nodes n1, n2) as root, installing
Debian's packages if missing; where it cannot (not root, no package registry) every test here is skipped
with its one-line reason. Jobs are polled with ``scontrol show job`` (``sbatch --wait`` polls slowly).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdpg_scale.experiments.grid import grid_runs
from tests.helpers import grid_yaml, tiny_grid

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SMOKE = ["configs/smoke.yaml", "train.steps=4", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root to start munge/slurmctld/slurmd (not root here)")
    done = subprocess.run(["bash", str(ROOT / "slurm/testing/start_cluster.sh")], capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    yield
    subprocess.run(["bash", str(ROOT / "slurm/testing/stop_cluster.sh")], capture_output=True, timeout=60)


def _env(**extra):
    env = dict(os.environ, FDPG_PYTHON=sys.executable, **extra)
    env.pop("SLURM_JOB_ID", None)
    return env


def submit(tmp_path, name, args, sbatch_opts=(), **env):
    out = tmp_path / f"{name}.out"
    done = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--job-name={name}", *sbatch_opts,
                           "slurm/train.sbatch", *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], out


def job_field(job, field):
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", text)
    return match.group(1) if match else None


def wait_job(job, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s (state {job_field(job, 'JobState')})")


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_one_node_two_tasks(cluster, tmp_path):
    job, out = submit(tmp_path, "one-node", [*SMOKE, f"output_dir={tmp_path / 'run'}"],
                      ["--ntasks-per-node=2"], FDPG_LAUNCH="srun")
    assert wait_job(job) == "COMPLETED", out.read_text()[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert "world 2" in out.read_text()
    assert "1 CPUs per task, 1 rank(s) per task, OMP_NUM_THREADS=1" in out.read_text()


def test_two_nodes_torchrun(cluster, tmp_path):
    job, out = submit(tmp_path, "two-node", [*SMOKE, f"output_dir={tmp_path / 'run'}"], ["--nodes=2",
                                                                                           "--cpus-per-task=2"])
    assert wait_job(job) == "COMPLETED", out.read_text()[-3000:]
    assert job_field(job, "NodeList") == "n[1-2]"
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert "world 2" in out.read_text()
    # torchrun mode: the node's CPUs go to its one rank, and srun was told (not 1 CPU by default)
    assert "2 CPUs per task, 1 rank(s) per task, OMP_NUM_THREADS=2" in out.read_text()


def test_bad_input_fails_fast(cluster, tmp_path):
    # The three jobs are submitted together (they fail independently; the cluster runs them side by side).
    job, out = submit(tmp_path, "no-config", [])
    # 3 ranks × micro_batch 4 do not divide global_batch 8
    world_job, world_out = submit(tmp_path, "bad-world", [*SMOKE, f"output_dir={tmp_path / 'run'}"], (),
                                  NPROC_PER_NODE="3")
    # requeued before any checkpoint exists: the resumed job has nothing to resume from
    ckpt_job, ckpt_out = submit(tmp_path, "no-ckpt", ["configs/smoke.yaml", "train.steps=50",
                                                      "train.save_every=100", f"output_dir={tmp_path / 'empty'}"])
    assert wait_job(job, 60) == "FAILED"
    assert "no CONFIG given" in out.read_text()
    end = time.monotonic() + 90
    while "restart 0" not in (ckpt_out.read_text() if ckpt_out.exists() else ""):
        assert time.monotonic() < end, job_field(ckpt_job, "JobState")
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", ckpt_job], check=True)
    assert wait_job(world_job, 90) == "FAILED"
    text = world_out.read_text()
    assert "not a multiple of train.micro_batch × world size" in text and "step 1" not in text
    assert not (tmp_path / "run").exists()
    assert wait_job(ckpt_job, 120) == "FAILED"
    assert "nothing to resume from" in ckpt_out.read_text().splitlines()[-1]


SLOW_SAVE = ROOT / "tests/slurm/slow_checkpoint"  # test-only: its sitecustomize delays the save by 35 s


def test_preemption_requeue_resumes(cluster, tmp_path):
    """torchrun mode, 2 ranks, and a stop-signal checkpoint slowed past torchrun's 30 s shutdown timeout: the
    save must complete, the requeued job resume from it, and the result equal an uninterrupted run."""
    args = ["configs/smoke.yaml", "train.steps=16", "train.save_every=100", "logging.progress_bar=false",
            "logging.tensorboard=false"]
    job, out = submit(tmp_path, "preempt", [*args, f"output_dir={tmp_path / 'cut'}"], ["--nodes=1"],
                      NPROC_PER_NODE="2", PYTHONPATH=str(SLOW_SAVE))
    # The reference runs on the other node meanwhile: the cut job spends most of its time waiting (the 35 s
    # save, the requeue), so the two together take little longer than the cut job alone.
    ref, ref_out = submit(tmp_path, "uncut", [*args, f"output_dir={tmp_path / 'uncut'}"], ["--ntasks-per-node=2"],
                          FDPG_LAUNCH="srun")
    end = time.monotonic() + 180
    while not (tmp_path / "cut/metrics.jsonl").exists() or len(metrics(tmp_path / "cut")) < 2:
        assert time.monotonic() < end and job_field(job, "JobState") in ("PENDING", "RUNNING"), out.read_text()
        time.sleep(0.5)
    # what --signal=B:USR1@N does before the time limit, now
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    end = time.monotonic() + 300
    while job_field(job, "Restarts") == "0" and time.monotonic() < end:
        time.sleep(1)
    assert wait_job(job, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "stopping at step" in text and "requeueing job" in text and job_field(job, "Restarts") == "1", text
    assert "[test injection] checkpoint save delayed by 35 s" in text
    stopped = int(re.search(r"stopping at step (\d+)", text).group(1))
    # the slow save completed (nothing SIGKILLed it after 30 s) and the requeued job resumed from it
    assert 2 <= stopped < 16 and f"resumed at step {stopped}" in text, text[-3000:]
    assert not list((tmp_path / "cut/checkpoints").glob(".tmp-*"))
    assert wait_job(ref) == "COMPLETED", ref_out.read_text()[-3000:]
    cut, uncut = metrics(tmp_path / "cut"), metrics(tmp_path / "uncut")
    assert [m["step"] for m in cut] == [m["step"] for m in uncut] == list(range(1, 17))
    assert [m["loss"] for m in cut] == [m["loss"] for m in uncut]
    # the final parameters: both runs exported to Hugging Face directories, compared tensor by tensor
    from safetensors.torch import load_file

    tensors = []
    for name in ("cut", "uncut"):
        subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "export", str(tmp_path / name), "--to",
                        str(tmp_path / f"{name}-hf")], cwd=ROOT, check=True, capture_output=True, timeout=120)
        files = sorted((tmp_path / f"{name}-hf").glob("*.safetensors"))
        assert files
        tensors.append({k: v for f in files for k, v in load_file(f).items()})
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key


def _script(args, **env):
    done = subprocess.run(["bash", *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_sweep_array(cluster, tmp_path):
    (array,) = _script(["slurm/sweep.sh", f"--output={tmp_path}/%A_%a.out", "--", str(tmp_path), "configs/smoke.yaml",
                        "train.steps=2", "logging.progress_bar=false", "logging.tensorboard=false"],
                       FDPG_DIVERGENCES="js rkl")
    for task in (0, 1):
        assert wait_job(f"{array}_{task}") == "COMPLETED", (tmp_path / f"{array}_{task}.out").read_text()[-3000:]
    for div in ("js", "rkl"):
        assert [m["step"] for m in metrics(tmp_path / f"smoke-{div}")] == [1, 2]
        assert f"divergence:\n  name: {div}" in (tmp_path / f"smoke-{div}" / "config.yaml").read_text()


def test_reproduce_array_of_a_grid_file(cluster, tmp_path):
    """slurm/reproduce.sh with a --grid file, as a user runs it: prepare (the tiny base, the prompts), the
    array (one run per task: kl and js, one node each when both are free) and the report."""
    grid = tiny_grid(tmp_path, seeds=(0,))
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_yaml(grid))
    out = tmp_path / "out"
    prepare, array, report = _script(["slurm/reproduce.sh", f"--output={tmp_path}/%x-%j.out", "--", str(out),
                                      "--grid", str(grid_file)])

    def logs():
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.out")))

    runs = len(grid_runs(grid))
    assert wait_job(prepare, 300) == "COMPLETED", logs()
    for task in range(runs):
        assert wait_job(f"{array}_{task}", 300) == "COMPLETED", logs()
    assert wait_job(report, 120) == "COMPLETED", logs()
    results = json.loads((out / "results.json").read_text())
    assert sorted(c["index"] for c in results["runs"]) == list(range(runs)) == [0, 1]
    for cell in results["runs"]:
        assert [p["samples"] for p in cell["curve"]] == [0, 8, 16]    # the base, then each checkpoint
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and "**Claim 1: " in text and "(test grid)" in text


def test_chain_train_eval_export(cluster, tmp_path):
    out = tmp_path / "run"
    train, evaluate, export = _script(["slurm/chain.sh", f"--output={tmp_path}/train.out", "--", "configs/smoke.yaml",
                                       str(out), "train.steps=2", "logging.progress_bar=false",
                                       "logging.tensorboard=false"], FDPG_EVAL_ARGS="--samples 16",
                                      FDPG_LOG_DIR=str(tmp_path))
    assert job_field(evaluate, "Dependency") == f"afterok:{train}(unfulfilled)"
    for job in (train, evaluate, export):
        assert wait_job(job) == "COMPLETED", (tmp_path / "train.out").read_text()[-3000:]
    assert (out / "eval.json").is_file() and (out / "hf" / "config.json").is_file()
    assert f"slurm-fdpg-step-{export}.out" in os.listdir(tmp_path)


def test_an_error_after_start_is_one_line_under_torchrun(cluster, tmp_path):
    """A target the λ fit cannot reach is found only after the engines start (2 nodes, torchrun): rank 0's
    one line ends the log; torchrun's teardown and ChildFailedError report are left out."""
    job, out = submit(tmp_path, "unreachable", [*SMOKE, f"output_dir={tmp_path / 'run'}", "target.kind=distributional",
                                                "target.moment=1.5", "target.fit_samples=8"], ["--nodes=2"])
    assert wait_job(job) == "FAILED"
    text = out.read_text()
    ours = [line for line in text.splitlines() if line.startswith("fdpg-scale: ")]
    assert len(ours) == 1 and "target.moment=1.5" in ours[0], text[-3000:]
    assert "ChildFailedError" not in text and "Traceback" not in text, text[-3000:]
