"""Chaos soak: a 2-rank training run hit by faults at random moments, restarted with resume after each one, and
compared step by step with the same run left alone.

    .venv/bin/python scripts/chaos_soak.py --out runs/chaos --steps 60 --faults 5 --seed 0
    .venv/bin/python scripts/chaos_soak.py --out runs/soak --steps 80 --faults 24 --seed 1 --record soak.json

Each launch is ``torchrun --standalone --nproc_per_node 2 -m fdpg_scale.cli train`` on ``configs/smoke.yaml``
(``--steps`` steps, a checkpoint every ``--save-every``). While it trains, one fault, drawn from ``--seed``, hits
it after a random number of its steps (0-3) plus a random fraction of a second, so that faults land in
generation, backward, a checkpoint save or the resume itself:

- ``kill-rank``: SIGKILL to one rank (the other's next collective fails; torchrun ends the job);
- ``kill-launcher``: SIGKILL to torchrun; the orphaned ranks go on for up to a second, then are SIGKILLed, as the
  scheduler reaps a job step whose launcher died (nothing else would stop them on a bare machine);
- ``usr1``: SIGUSR1 to every process of the job (SLURM's ``--signal``, torchrun ignoring it as in
  slurm/train.sbatch): the ranks checkpoint at the next step boundary and exit;
- ``term``: SIGTERM to torchrun, which forwards it to the ranks (a scheduler's cancel).

After a kill, half of the time the last line of ``metrics.jsonl`` is cut in the middle, as a kill during its
write leaves it (too short a window to hit by chance), when a kill could have: while that step has no checkpoint. Every process of a launch is gone before the next starts.
After ``--faults`` faults the run goes on to its last step undisturbed. Then the reference run (same settings,
no fault) runs, and every step's loss, log Z, baseline and proposal version must equal it (to ``--tol``), and
``metrics.jsonl`` must hold each step once, in order, every line whole.

The figures (faults by kind, resumes, steps compared, mismatches) are printed as JSON and written to
``--record``. Exit status 0 when nothing differs, 1 otherwise. Nothing of this is used by the product: it is the
test of docs/reliability.md's promises (tests/distributed/test_chaos.py runs a short one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
KINDS = ("kill-rank", "kill-launcher", "usr1", "term")
#: The per-step values that must equal the uninterrupted run's.
COMPARED = ("loss", "log_z", "baseline", "proposal_version")
#: Variables of an enclosing launcher that would make a launch take itself for one of its ranks.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")
#: The variable that marks every process of one launch (see start_training).
JOB_MARKER = "FDPG_CHAOS_JOB"


@dataclass
class Fault:
    """One injected fault: ``after_steps`` steps into launch ``launch``, then ``delay_s`` more."""
    launch: int
    kind: str
    after_steps: int
    delay_s: float
    rank: int
    tear_log: bool
    injected_at_step: int | None = None


# ------------------------------------------------------------------------------------------------ processes
def launch_env() -> dict[str, str]:
    """This environment without launcher variables, one thread per rank, unbuffered, offline and quiet."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    return env


def start_training(out: Path, overrides: list[str], log: Path, *, nproc: int = 2,
                   launcher_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """torchrun on ``nproc`` ranks of ``fdpg-scale train``, torchrun ignoring SIGUSR1 as slurm/train.sbatch makes
    it; output to ``log``. torchrun starts each rank in a session of its own, so the job's processes are found by
    a variable they all inherit (``JOB_MARKER``, unique per launch; the product never reads it): that finds the
    ranks even after their launcher died. launcher_args: more torchrun options."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *launcher_args, "-m", "fdpg_scale.cli", "train", "--config", str(SMOKE), f"output_dir={out}",
           "logging.progress_bar=false", "logging.tensorboard=false", *overrides]
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(cmd, cwd=REPO, env={**launch_env(), JOB_MARKER: token}, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    launcher.job_token = token
    return launcher


def job_pids(launcher: subprocess.Popen) -> dict[int, int | None]:
    """{pid: rank} of the live processes of the launcher's job (the launcher itself: rank None), from /proc."""
    marker = f"{JOB_MARKER}={launcher.job_token}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in env and state != "Z":
            ranks = [int(item[5:]) for item in env if item.startswith(b"RANK=")]
            found[int(entry.name)] = ranks[0] if ranks else None
    return found


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's ranks."""
    return {rank: pid for pid, rank in job_pids(launcher).items() if rank is not None}


def signal_job(launcher: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to every process of the job (what ``scancel --signal`` does to a job step's processes)."""
    for pid in job_pids(launcher):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_job(launcher: subprocess.Popen, grace_s: float) -> int | None:
    """Wait up to ``grace_s`` for the launcher to exit, then SIGKILL whatever is left of its job and wait until
    none of it is alive. Returns the launcher's exit status (None if it had to be killed)."""
    try:
        status = launcher.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        status = None
    end = time.monotonic() + 60
    while pids := job_pids(launcher):
        signal_job(launcher, signal.SIGKILL)
        if time.monotonic() > end:
            raise RuntimeError(f"processes {sorted(pids)} of the job survive SIGKILL")
        time.sleep(0.1)
    if launcher.poll() is None:
        launcher.wait()
    return status


# ----------------------------------------------------------------------------------------------- the run log
def last_step(metrics: Path) -> int:
    """The step of the last whole line of ``metrics.jsonl`` (0 if none)."""
    if not metrics.exists():
        return 0
    lines = metrics.read_text(encoding="utf-8").split("\n")[:-1]  # the part after the last "\n" may be torn
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def read_metrics(metrics: Path) -> list[dict]:
    """Every row of ``metrics.jsonl``; raises AssertionError on a torn or unparsable line."""
    text = metrics.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{metrics}: the last line is not whole: {text[-80:]!r}"
    rows = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{metrics} line {number} is not JSON: {line[:80]!r}") from None
    return rows


def newest_checkpoint_step(out: Path) -> int:
    """The step of the newest committed checkpoint of run ``out`` (0 if none)."""
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if (p / "meta.json").is_file()]
    return max(steps, default=0)


def tear_last_line(metrics: Path) -> bool:
    """Cut the last line of ``metrics.jsonl`` in the middle (what a kill during its write leaves), if a kill could
    have cut it: only while its step has no checkpoint (a step's line is written before its checkpoint, so a kill
    during the write comes before the save)."""
    if not metrics.exists() or last_step(metrics) <= newest_checkpoint_step(metrics.parent):
        return False
    data = metrics.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    if len(data) - start < 4:
        return False
    metrics.write_bytes(data[:start + (len(data) - start) // 2])
    return True


def compare(reference: list[dict], chaos: list[dict], tol: float) -> list[str]:
    """Every difference between the two runs' rows: steps (each once, in order) and the COMPARED values."""
    problems = []
    steps = [row["step"] for row in chaos]
    if steps != [row["step"] for row in reference]:
        problems.append(f"steps {steps} != the reference's {[row['step'] for row in reference]}")
    for ref, got in zip(reference, chaos):
        for key in COMPARED:
            a, b = got.get(key), ref.get(key)
            if (a is None) != (b is None) or (a is not None and abs(a - b) > tol * max(1.0, abs(b))):
                problems.append(f"step {ref['step']} {key}: {a!r} after faults, {b!r} uninterrupted")
    return problems


# --------------------------------------------------------------------------------------------------- the soak
def plan_faults(count: int, rng: random.Random) -> list[Fault]:
    """``count`` faults: every kind at least once when count ≥ 4, the rest drawn at random, in random order."""
    kinds = list(KINDS) * (count // len(KINDS)) if count >= len(KINDS) else []
    kinds += [rng.choice(KINDS) for _ in range(count - len(kinds))]
    rng.shuffle(kinds)
    return [Fault(launch=i, kind=kind, after_steps=rng.randint(0, 3), delay_s=round(rng.uniform(0.0, 0.4), 3),
                  rank=rng.randint(0, 1), tear_log=kind.startswith("kill") and rng.random() < 0.5)
            for i, kind in enumerate(kinds)]


def _wait_for_start(launcher: subprocess.Popen, log: Path, timeout_s: float) -> int | None:
    """The step this launch starts from (its "fresh start" / "resumed at step N" line), or None if it ended."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "fresh start" in text:
            return 0
        if "resumed at step " in text:
            return int(text.split("resumed at step ", 1)[1].split()[0])
        if launcher.poll() is not None:
            return None
        time.sleep(0.05)
    raise RuntimeError(f"launch never started training within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _inject(fault: Fault, launcher: subprocess.Popen, rng: random.Random) -> None:
    if fault.kind == "kill-rank":
        pids = rank_pids(launcher)
        if fault.rank in pids:
            os.kill(pids[fault.rank], signal.SIGKILL)
    elif fault.kind == "kill-launcher":
        os.kill(launcher.pid, signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 1.0))  # the orphaned ranks train on until the scheduler reaps them
        signal_job(launcher, signal.SIGKILL)
    elif fault.kind == "usr1":
        signal_job(launcher, signal.SIGUSR1)
    else:
        os.kill(launcher.pid, signal.SIGTERM)


def soak(out: Path, *, steps: int, faults: int, seed: int, model: Path, save_every: int = 2, timeout_s: float = 20,
         tol: float = 1e-6, overrides: tuple[str, ...] = (), say=print) -> dict:
    """Run the soak under ``out`` (``chaos/`` the faulted run, ``reference/`` the undisturbed one, ``logs/`` every
    launch's output); returns the figures: faults (each with its launch, kind and the step it hit), resumes,
    launches, steps compared, mismatches (a list of differences, empty when the runs agree)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    args = [f"model.path={model}", f"train.steps={steps}", f"train.save_every={save_every}",
            f"distributed.timeout_s={timeout_s:g}", *overrides]
    chaos, metrics = out / "chaos", out / "chaos" / "metrics.jsonl"
    planned, done, resumes, launch = plan_faults(faults, rng), [], 0, 0
    started = time.monotonic()
    while True:
        log = logs / f"launch_{launch:03d}.log"
        launcher = start_training(chaos, args, log)
        start = _wait_for_start(launcher, log, timeout_s=600)
        resumes += bool(start)
        fault = planned[len(done)] if len(done) < len(planned) else None
        if fault is None:
            status = end_job(launcher, grace_s=1800)
            if status != 0 or last_step(metrics) != steps:
                raise RuntimeError(f"the last launch ended with {status} at step {last_step(metrics)}:\n"
                                   f"{log.read_text()[-3000:]}")
            break
        target = (start or 0) + fault.after_steps
        while last_step(metrics) < target and launcher.poll() is None:
            time.sleep(0.02)
        if launcher.poll() is not None:  # it finished (or failed) before the fault's moment
            status = end_job(launcher, grace_s=0)
            if status != 0:
                raise RuntimeError(f"launch {launch} failed on its own ({status}):\n{log.read_text()[-3000:]}")
            raise RuntimeError(f"the run finished before fault {len(done) + 1} of {faults}: give it more steps")
        time.sleep(fault.delay_s)
        fault.launch, fault.injected_at_step = launch, last_step(metrics)
        _inject(fault, launcher, rng)
        end_job(launcher, grace_s=timeout_s + 60)
        if fault.tear_log:
            fault.tear_log = tear_last_line(metrics)
        done.append(fault)
        say(f"[chaos] launch {launch}: {fault.kind}"
            + (f" rank {fault.rank}" if fault.kind == "kill-rank" else "")
            + f" at step {fault.injected_at_step}" + (" (log line torn)" if fault.tear_log else ""))
        launch += 1
    chaos_seconds = time.monotonic() - started
    reference = out / "reference"
    ref_log = logs / "reference.log"
    status = end_job(start_training(reference, args, ref_log), grace_s=1800)
    if status != 0:
        raise RuntimeError(f"the reference run failed ({status}):\n{ref_log.read_text()[-3000:]}")
    problems = compare(read_metrics(reference / "metrics.jsonl"), read_metrics(metrics), tol)
    return {"seed": seed, "steps": steps, "save_every": save_every, "faults_injected": len(done),
            "faults_by_kind": {k: sum(f.kind == k for f in done) for k in KINDS},
            "torn_log_lines": sum(f.tear_log for f in done), "launches": launch + 1, "resumes": resumes,
            "steps_compared": steps, "values_compared": list(COMPARED), "tolerance": tol,
            "mismatches": problems, "chaos_seconds": round(chaos_seconds, 1),
            "faults": [asdict(f) for f in done]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (emptied first)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--faults", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=20.0, help="distributed.timeout_s of every launch")
    p.add_argument("--model", type=Path, default=None,
                   help="a local HF model directory (default: the smoke config's tiny GPT-2, built under --out)")
    p.add_argument("--record", type=Path, default=None, help="also write the figures as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides for every launch")
    a = p.parse_args(argv)
    import shutil

    shutil.rmtree(a.out, ignore_errors=True)
    model = a.model
    if model is None:
        from fdpg_scale.models.tiny import build_tiny_model_dir

        model = build_tiny_model_dir(a.out / "model", "gpt2", seed=0)
    report = soak(a.out, steps=a.steps, faults=a.faults, seed=a.seed, model=model, save_every=a.save_every,
                  timeout_s=a.timeout_s, overrides=tuple(a.overrides))
    text = json.dumps(report, indent=1)
    print(text)
    if a.record is not None:
        a.record.write_text(text + "\n")
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
