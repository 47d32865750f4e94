"""``fdpg-scale train --nproc-per-node N ...``: check the run for N ranks in this one process, then start them.

1. The pre-start checks of every rank (``training/preflight.py``: batch sizes against the world size, model,
   tokenizer, prompts, scorers, trackers, DeepSpeed JSON) run here with world size N, so that a bad input is one
   line from one process, never one per rank followed by torchrun's failure report.
2. Then ``python -m torch.distributed.run --standalone --nproc-per-node N -m fdpg_scale.cli train ...`` runs the
   same command line without ``--nproc-per-node`` (a free rendezvous port: concurrent runs do not collide), in its
   own session, with the launcher variables of any outer job removed (``launch.child_env``).
3. Its exit status is this command's.

Signals, as a scheduler sends them to the command it started:

- SIGUSR1 and SIGTERM go straight to the ranks (torchrun's children), not to torchrun: each rank then
  checkpoints at its next step boundary and exits normally (``training/preemption.py``), and torchrun ends with
  them. Sent to torchrun, SIGTERM would be a death signal (forward, wait 30 s, SIGKILL: a long checkpoint is
  cut short) and SIGUSR1 would kill torchrun at once, orphaning the ranks; torchrun starts with SIGUSR1
  ignored for the same reason (as ``slurm/train.sbatch`` starts it);
- SIGINT (Ctrl-C) goes to torchrun, which stops the ranks as a plain torchrun would.

The ranks are found as torchrun's child processes in ``/proc`` (Linux). On several nodes, or to set torchrun's
other options, start torchrun, the deepspeed launcher or ``slurm/train.sbatch`` yourself (README, "Training a
language model"): this command is the one-node shortcut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fdpg_scale.distributed.launch import child_env
from fdpg_scale.errors import ConfigError

__all__ = ["launch", "parse_nproc", "rank_command", "children"]

#: Signals forwarded to the ranks themselves (preemption), and to torchrun (an interactive stop).
TO_RANKS = (signal.SIGUSR1, signal.SIGTERM)
TO_TORCHRUN = (signal.SIGINT,)


def parse_nproc(text: str) -> int:
    """The value of ``--nproc-per-node``: an integer ≥ 1 (one-line ConfigError otherwise)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != text.strip():
        raise ConfigError(f"--nproc-per-node must be an integer ≥ 1 (ranks on this node), got {text!r}")
    return n


def rank_command(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """The torchrun command line that starts ``nproc`` ranks of ``fdpg-scale train --config CONFIG OVERRIDES``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fdpg_scale.cli", "train", "--config", config, *overrides]


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:       # the process ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def launch(args) -> int:
    """``fdpg-scale train --nproc-per-node N --config FILE [key=value ...]`` (module docstring); the exit status."""
    from fdpg_scale.training.config import load_config
    from fdpg_scale.training.preflight import preflight

    nproc = parse_nproc(args.nproc_per_node)
    for key in ("RANK", "WORLD_SIZE"):
        if key in os.environ:
            raise ConfigError(f"--nproc-per-node starts its own ranks, but {key} is set: this process is already a "
                              f"rank of a launcher's job (torchrun, deepspeed); leave --nproc-per-node out there")
    preflight(load_config(args.config, args.overrides), world_size=nproc)
    print(f"fdpg-scale: checked for {nproc} ranks; starting them with torchrun", file=sys.stderr, flush=True)

    # torchrun inherits SIGUSR1 ignored (an ignored disposition survives fork and exec; the ranks install their
    # own handler), then this process forwards it: ignored here only while torchrun starts.
    previous = {sig: signal.getsignal(sig) for sig in (*TO_RANKS, *TO_TORCHRUN)}
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(rank_command(nproc, args.config, list(args.overrides)), env=child_env(),
                                start_new_session=True)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise

    def to_ranks(signum, frame):
        for pid in children(proc.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def to_torchrun(signum, frame):
        proc.send_signal(signum)

    for sig in TO_RANKS:
        signal.signal(sig, to_ranks)
    for sig in TO_TORCHRUN:
        signal.signal(sig, to_torchrun)
    try:
        status = proc.wait()
        return status if status >= 0 else 128 - status   # killed by a signal: the shell's 128 + N
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
