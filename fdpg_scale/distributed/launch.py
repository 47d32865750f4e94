"""Process-group set-up and small collectives: who am I, start the group, agree on numbers.

Rank, world size, local rank and the rendezvous address come from, in order:

1. torchrun / the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
2. SLURM (``srun python ...`` starting one process per task): ``SLURM_PROCID``, ``SLURM_NTASKS``,
   ``SLURM_LOCALID`` and the first host of ``SLURM_JOB_NODELIST``; DeepSpeed's own init never reads these,
   so ``resolve_launch`` maps them; the port is ``MASTER_PORT`` if set, else derived from the job id so that
   two jobs sharing a node do not collide;
3. nothing: a single process (rank 0 of 1) on 127.0.0.1 with a free port.

``resolve_launch`` is a pure function of an environment mapping (unit-tested on dicts);
``init_distributed`` applies it to ``os.environ`` and starts DeepSpeed's process group: gloo on CPU, nccl on
CUDA (the CPU accelerator would otherwise ask for oneCCL).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fdpg_scale.distributed.omp_threads import serial_side_threads

__all__ = ["LaunchInfo", "resolve_launch", "expand_hostlist", "device_index", "init_distributed", "device",
           "get_rank", "get_world_size", "is_rank0", "barrier", "all_reduce_floats", "all_gather_rows",
           "LAUNCHER_VARIABLES", "child_env", "DEFAULT_TIMEOUT_S", "is_collective_failure"]

#: Under SLURM without MASTER_PORT, the rendezvous port is chosen from the job id in [BASE, BASE + COUNT).
_SLURM_PORT_BASE, _SLURM_PORT_COUNT = 20000, 20000


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job. ``source`` is ``torchrun``, ``slurm`` or ``single``."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    def env(self, visible_gpus: int | None = None) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous and DeepSpeed read.

        visible_gpus: the GPUs this process sees (None on CPU). DeepSpeed takes ``LOCAL_RANK`` as a device
        ordinal: ``init_process_group(device_id=...)`` (deepspeed/comm/torch.py), ``zero.Init``'s
        ``set_device(LOCAL_RANK)`` (runtime/zero/partition_parameters.py) and the engine's device
        (runtime/engine.py). With one GPU per task (``srun --gpus-per-task=1``) the SLURM local id runs up to
        the node's task count while each task sees one device, so ``LOCAL_RANK`` is exported as the index
        among the visible GPUs (``device_index``), never the raw local id. ``self.local_rank`` keeps the
        position on the node.
        """
        local = self.local_rank if visible_gpus is None else device_index(self.local_rank, visible_gpus)
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(local),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


#: What a launcher (torchrun, deepspeed, srun) sets to tell a process its place in a job, read by resolve_launch.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def child_env(env: Mapping[str, str] | None = None, **values: str) -> dict[str, str]:
    """The environment for a child process that starts a job of its own (a CLI run, its own torchrun): ``env``
    (default ``os.environ``) without ``LAUNCHER_VARIABLES``, which would make the child take itself for one of
    this job's ranks, with ``values`` set on top."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k not in LAUNCHER_VARIABLES}
    out.update(values)
    return out


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: ``"n[1-3],gpu07"`` → ``["n1", "n2", "n3", "gpu07"]``.

    Handles comma-separated items, bracket groups of numbers and ranges with zero padding (``node[01-03,7]``)
    and several groups in one name (``r[1-2]n[1-2]`` is their product), which is what
    ``scontrol show hostnames`` does for these forms.
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise ValueError(f"nodelist {nodelist!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"nodelist {nodelist!r}: unbalanced '['")
    items.append(nodelist[start:])
    hosts: list[str] = []
    for item in items:
        if not item:
            raise ValueError(f"nodelist {nodelist!r}: empty host name")
        hosts.extend(_expand_one(item, nodelist))
    return hosts


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    values = []
    for part in m.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit() and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values.extend(str(v).zfill(width) for v in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"nodelist {whole!r}: cannot parse range {part!r}")
    return [head + v + rest for v in values for rest in _expand_one(tail, whole)]


def resolve_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Rank, world, local rank and rendezvous address from an environment mapping (see module docstring)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun "
                             f"or the deepspeed launcher, or set all of them")
        info = LaunchInfo(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                          local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                          master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"), source="torchrun")
    elif "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        for key in ("SLURM_NTASKS", "SLURM_LOCALID"):
            if key not in env:
                raise ValueError(f"SLURM_PROCID is set but {key} is not: start the processes with srun")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            # One port per job, so that two jobs sharing a node do not collide.
            port = _SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % _SLURM_PORT_COUNT
        else:
            raise ValueError("SLURM_PROCID is set but neither MASTER_PORT nor SLURM_JOB_ID is")
        info = LaunchInfo(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
                          local_rank=_int(env, "SLURM_LOCALID"),
                          master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
                          master_port=port, source="slurm")
    else:
        info = LaunchInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                          master_port=_free_port(), source="single")
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is not in [0, world size {info.world_size}) ({info.source})")
    if info.local_rank < 0:
        raise ValueError(f"local rank {info.local_rank} must be ≥ 0 ({info.source})")
    return info


def device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a process uses: ``local_rank mod visible_devices``. With one GPU per task (``srun
    --gpus-per-task=1``, or a CUDA_VISIBLE_DEVICES per process) every process sees one device, index 0, while
    its local rank runs up to the node's process count."""
    if visible_devices < 1:
        raise RuntimeError(f"no GPU is visible to this process (local rank {local_rank}): check "
                           f"CUDA_VISIBLE_DEVICES / the job's GPU request")
    return local_rank % visible_devices


#: Seconds a collective may wait for the other ranks when the caller gives none (``distributed.timeout_s``).
DEFAULT_TIMEOUT_S = 600.0


def init_distributed(env: Mapping[str, str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchInfo:
    """Start the process group (idempotent) and select this process's device; returns the LaunchInfo.

    env: the environment to read (default ``os.environ``); the resolved variables are written back into
    ``os.environ`` because torch's env:// rendezvous reads them from there.
    timeout_s: how long the rendezvous and every collective of the group (and of the groups DeepSpeed derives
    from it) wait for the other ranks before failing. Without it a rank that stops answering keeps the others
    waiting forever (gloo) or for torch's default (nccl's watchdog). Ignored when the group is already up.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = resolve_launch(os.environ if env is None else env)
    accel = get_accelerator()
    visible = accel.device_count() if accel.device_name() == "cuda" else None
    os.environ.update(info.env(visible_gpus=visible))
    if visible is not None:
        accel.set_device(device_index(info.local_rank, visible))
        backend = "nccl"
    elif accel.device_name() == "cpu":
        backend = "gloo"
    else:
        backend = accel.communication_backend_name()
    if not torch.distributed.is_initialized():
        # Before gloo makes its threads: else their OpenMP teams slow every op of a 1-process run (omp_threads.py).
        serial_side_threads()
        timeout = datetime.timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        _clone_world_group(timeout)
    ignore_deepspeed_collective_deprecations()
    return info


def _clone_world_group(timeout: datetime.timedelta) -> None:
    """Make DeepSpeed's clone of the world group now, with ``timeout``.

    ZeRO's collectives (parameter all-gathers, gradient reduce-scatters) run on a clone of the world group that
    DeepSpeed makes on first use (``deepspeed.utils.groups._clone_world_group``) with ``new_group(ranks)``, which
    takes torch's default timeout (30 min for gloo), not the world group's: a hung rank would then hold the others
    for 30 minutes whatever ``distributed.timeout_s`` says. Collective: every rank calls it.
    """
    from deepspeed.utils import groups

    # Called right after a fresh init_process_group, so a clone already there belongs to a group destroyed before
    # (a second run in one process: the tests, a sweep); DeepSpeed would hand that dead group to ZeRO.
    groups._WORLD_GROUP = torch.distributed.new_group(ranks=list(range(torch.distributed.get_world_size())),
                                                      timeout=timeout)


# DeepSpeed 0.19's ZeRO-3 parameter coordinator calls these two torch collectives, which torch 2.13 marks as
# deprecated. Something in the step toggles the warning filters, which resets Python's once-per-location
# memory, so each warning came back every step: 120 of a demo run's 254 log lines, about code that is not
# ours and not the user's. Only these two messages are ignored; a deprecation in our own calls still shows.
_DEEPSPEED_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def ignore_deepspeed_collective_deprecations() -> None:
    """Ignore torch's FutureWarning for the two deprecated collectives DeepSpeed's ZeRO-3 uses (see above)."""
    warnings.filterwarnings("ignore", message=_DEEPSPEED_DEPRECATED_COLLECTIVES, category=FutureWarning)


# What gloo's and NCCL's failures of a collective say; torch raises most of them as plain RuntimeErrors. Seen with
# torch 2.13 and a stopped rank: "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv
# operation to complete" (a blocking collective), "Application timeout caused pair closure" (an async one's
# wait(), as ZeRO-3's parameter all-gathers); with a killed rank: "Connection closed by peer".
_COLLECTIVE_FAILURES = ("gloo/transport", "third_party/gloo", "Timed out waiting", "Application timeout",
                        "pair closure", "Connection closed by peer", "Connection reset by peer", "NCCL error",
                        "ncclRemoteError", "Watchdog caught collective")


def is_collective_failure(err: BaseException) -> bool:
    """True for the errors a failed collective raises (torch's DistError family, gloo's and NCCL's messages):
    another rank hung past the group's timeout, or died."""
    if isinstance(err, torch.distributed.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _COLLECTIVE_FAILURES)


def device() -> torch.device:
    """This process's accelerator device (``cpu`` on the CPU accelerator, ``cuda:<local rank>`` on GPUs)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_floats(values: Sequence[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a few numbers across ranks in float64; returns a float64 CPU tensor of the same shape.

    op: ``sum``, ``mean``, ``max`` or ``min``. Runs on this process's device (nccl cannot reduce CPU tensors).
    """
    ops = {"sum", "mean", "max", "min"}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    t = torch.as_tensor(values, dtype=torch.float64).detach().clone().to(device())
    if torch.distributed.is_initialized() and get_world_size() > 1:
        red = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
               "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}[op]
        torch.distributed.all_reduce(t, op=red)
    if op == "mean":
        t = t / get_world_size()
    return t.cpu()


def all_gather_rows(rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows in rank order: {name: [B_r, ...]} -> {name: [Σ_r B_r, ...]} on CPU.

    Ranks may hold different row counts; within a rank all tensors must have the same B_r. Dtypes are kept.
    Collective: every rank calls it with the same names, trailing shapes and dtypes.
    """
    names = sorted(rows)
    if not names:
        return {}
    n = rows[names[0]].shape[0]
    for k in names:
        if rows[k].dim() == 0 or rows[k].shape[0] != n:
            raise ValueError(f"all_gather_rows: {k} has shape {tuple(rows[k].shape)}, expected [{n}, ...] like "
                             f"{names[0]}")
    world = get_world_size()
    if world == 1:
        return {k: rows[k].detach().cpu() for k in names}
    dev = device()
    counts = torch.zeros(world, dtype=torch.long, device=dev)
    counts[get_rank()] = n
    torch.distributed.all_reduce(counts)
    counts = counts.tolist()
    top = max(counts)
    out = {}
    for k in names:
        t = rows[k].detach().to(dev)
        padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=dev)
        padded[:n] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        out[k] = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
    return out
