"""Start the project in clean subprocesses, as a user would: the CLI on one process or under torchrun, and test
worker scripts on N torchrun ranks (gloo, CPU). Every test that needs a real process goes through here.

``run_ranks`` is the light alternative for unit tests of collective logic (who agrees with whom, which rank's
message wins): a function run on N forked copies of the test process joined in a gloo group, with no new
interpreter, import or launcher (about a second instead of torchrun's start-up).

A child process gets this process's environment without the launcher variables (``child_env``: an outer
torchrun's RANK/WORLD_SIZE would make it take itself for someone else's rank), one thread per process (two ranks
on two cores must not oversubscribe them) and unbuffered output. ``torchrun --standalone`` picks a free
rendezvous port, so concurrent test runs do not collide. Failures raise with the tail of the process's output.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fdpg_scale.distributed.launch import child_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
WORKERS = REPO / "tests" / "distributed" / "workers"
#: The ``fdpg-scale`` console script of the running interpreter's environment (what ``pip install`` made).
CONSOLE_SCRIPT = Path(sys.executable).parent / "fdpg-scale"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no launcher variables, one thread, unbuffered output, ``extra``."""
    return child_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a test worker script: ``cli_env`` plus the CPU accelerator, this checkout's extension
    cache, the Triton interpreter, the repository on the path (workers import tests.distributed.common) and
    quiet, offline transformers."""
    return cli_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
                   TRITON_INTERPRET="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", **extra)


def torchrun_prefix(nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N``: what the README's torchrun runs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _failure(cmd: list[str], proc: subprocess.CompletedProcess) -> AssertionError:
    return AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                          f"{proc.stderr[-6000:]}")


def run_cli(*args: str, nproc: int = 1, console_script: bool = False, script: Path | None = None,
            check: bool = True, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fdpg-scale ARGS`` in a fresh process from the repository root.

    nproc > 1: under torchrun; console_script: through the installed ``fdpg-scale`` script instead of
    ``python -m fdpg_scale.cli`` (one process); script: a Python file run instead of the CLI module (a test worker
    that wraps the CLI), with ARGS as its arguments. check: raise AssertionError with the output's tail on a
    non-zero exit status. env: variables added to ``cli_env``'s. Returns the completed process (text stdout and
    stderr)."""
    target = [str(script)] if script is not None else ["-m", "fdpg_scale.cli"]
    if nproc > 1:
        cmd = [*torchrun_prefix(nproc), *target, *args]
    elif console_script:
        cmd = [str(CONSOLE_SCRIPT), *args]
    else:
        cmd = [sys.executable, *target, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise _failure(cmd, proc)
    return proc


def run_train(out: Path, *overrides: str, model: Path, nproc: int = 1, config: Path = SMOKE) -> str:
    """``fdpg-scale train --config CONFIG output_dir=OUT model.path=MODEL OVERRIDES`` on ``nproc`` ranks (the
    smoke config builds its tiny model at ``model`` if it is not there); returns stdout + stderr."""
    proc = run_cli("train", "--config", str(config), f"output_dir={out}", f"model.path={model}",
                   "logging.progress_bar=false", *overrides, nproc=nproc)
    return proc.stdout + proc.stderr


def side_by_side(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent zero-argument ``calls`` (each starting its own processes: ``run_cli``, ``run_train``) at
    the same time, each in a thread; returns their results in order and raises the first failure.

    Why: a CLI process runs one thread (``cli_env``), so two one-rank runs one after another leave one of two
    cores idle; side by side they take about the time of one. Only for calls that share no output directory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def fill_paths(args: list[str], files: dict) -> list[str]:
    """A bad-input row's arguments with its ``{name}`` placeholders replaced by the files built for it."""
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


def one_line(err: str) -> str:
    """The single line the CLI printed on stderr (a traceback or any other line fails the test)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("fdpg-scale"), lines[0]
    return lines[0]


def export(out: Path, to: Path) -> dict[str, torch.Tensor]:
    """``fdpg-scale export OUT --to TO``; returns the exported weights {name: tensor}."""
    from safetensors.torch import load_file

    run_cli("export", str(out), "--to", str(to), timeout=300)
    return load_file(to / "model.safetensors")


def metrics(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    """Same names, and every tensor of ``a`` within ``rtol`` × max|b[name]| of ``b``'s (max abs difference)."""
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        scale = b[name].abs().max().item()
        assert err <= rtol * max(scale, 1e-12), f"{name}: max abs diff {err:.3e} (scale {scale:.3e})"


def torchrun_cmd(script: str | Path, nprocs: int, *args: str) -> list[str]:
    """torchrun on ``nprocs`` ranks of ``tests/distributed/workers/<script>`` (or an absolute script path)."""
    path = Path(script) if Path(script).is_absolute() else WORKERS / script
    return [*torchrun_prefix(nprocs), str(path), *map(str, args)]


def run_workers(script: str, nprocs: int, *args: str, timeout: float = 300) -> str:
    """Run ``tests/distributed/workers/<script>`` on ``nprocs`` ranks; returns the combined output, raises on
    failure. Workers write their results (losses, tensors) under a directory the test gives them."""
    cmd = torchrun_cmd(script, nprocs, *args)
    proc = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} on {nprocs} ranks exited with {proc.returncode}:\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    return proc.stdout + proc.stderr


@contextlib.contextmanager
def one_rank_zero3() -> Iterator[None]:
    """This test process as rank 0 of a world of 1 (gloo), for building ZeRO-3 engines in-process; on exit the
    group is destroyed (if this opened it), transformers' ZeRO-3 loading switched off again (the engines leave
    it on, and later tests build plain models) and the rendezvous variables init_distributed wrote into
    os.environ removed."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from fdpg_scale.distributed.launch import init_distributed

    saved_env = dict(os.environ)
    started = not torch.distributed.is_initialized()
    init_distributed()
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        if started:
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, results, args) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        results.put((rank, True, fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` forked processes that form the default process group (gloo, as the
    trainer's ranks on CPU); returns each rank's return value (picklable), in rank order. Raises AssertionError
    with a rank's traceback if one fails. ``fn`` must be a module-level function; nothing of the group
    outlives the call."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, results, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            out[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [out[rank] for rank in range(world)]


def load_script(relative: str):
    """A script of the repository (e.g. ``scripts/chaos_soak.py``) imported as a module, for its functions."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
