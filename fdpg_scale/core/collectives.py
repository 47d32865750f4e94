"""The seam through which the estimators reduce across ranks: a tiny ``Collective`` protocol.

The estimators (fdpg_scale.core.estimator) never call torch.distributed themselves; they take a Collective, so
the same code runs in one process (``LocalCollective``), in a real process group (``TorchDistCollective``,
gloo on CPU or nccl on GPUs) and in tests that simulate ranks in one process.

Every method returns a *new* tensor holding the reduction over all ranks (the input is not modified), with
the input's shape, dtype and device, and must be called by every rank of the group in the same order.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Collective", "LocalCollective", "TorchDistCollective"]


@runtime_checkable
class Collective(Protocol):
    """Reductions across the ranks of a group (every rank calls each method with same-shaped tensors)."""

    @property
    def world_size(self) -> int:
        """Number of ranks taking part."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*]: elementwise sum over ranks."""
        ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*]: elementwise max over ranks (−inf is the identity)."""
        ...


class LocalCollective:
    """One process: every reduction is the identity (a copy, so callers may modify the result)."""

    @property
    def world_size(self) -> int:
        return 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*] copy of ``tensor``."""
        return tensor.detach().clone()

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*] copy of ``tensor``."""
        return tensor.detach().clone()

    def __repr__(self) -> str:
        return "LocalCollective()"


class TorchDistCollective:
    """torch.distributed all-reduce over ``group`` (None: the default group, which must be initialised).

    Args:
        group: a process group, or None for the default one.
        device: where the reduction runs; None picks ``cuda`` (the current device) for an nccl group, which
            cannot reduce CPU tensors, and ``cpu`` otherwise (gloo). Results come back on the input's device.
    """

    def __init__(self, group=None, device: torch.device | str | None = None):
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("TorchDistCollective needs an initialised torch.distributed process group "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        if device is None:
            backend = torch.distributed.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size(self.group)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        buf = tensor.detach().to(self.device, copy=True).contiguous()
        torch.distributed.all_reduce(buf, op=op, group=self.group)
        return buf.to(tensor.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*]: elementwise sum over the group's ranks."""
        return self._reduce(tensor, torch.distributed.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """[*] -> [*]: elementwise max over the group's ranks."""
        return self._reduce(tensor, torch.distributed.ReduceOp.MAX)

    def __repr__(self) -> str:
        return f"TorchDistCollective(world_size={self.world_size}, device={self.device})"
