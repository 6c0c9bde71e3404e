"""`TorchDistCommunicator`: collectives over an initialised ``torch.distributed`` default process group.

Works with gloo (CPU tensors) and NCCL (CUDA tensors; call ``torch.cuda.set_device`` for the local rank before
constructing it, as ``all_gather_object`` relies on the current device). On NCCL, `Handle.wait` does not block
the host: it orders the result on the current CUDA stream, and the division of an averaged reduction is queued
there too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kfac_dist.comm.base import Communicator, Group, Handle


class WorkHandle(Handle):
    """A `Handle` around a ``torch.distributed`` work object."""

    def __init__(self, work: Any) -> None:
        """Wrap `work`, as returned by a ``torch.distributed`` call with ``async_op=True``."""
        self._work = work

    def wait(self) -> None:
        """Wait for the work (on NCCL: make the current stream wait for it)."""
        self._work.wait()

    def is_completed(self) -> bool:
        """Whether the work finished."""
        return bool(self._work.is_completed())


class TorchDistCommunicator(Communicator):
    """The `Communicator` over ``torch.distributed``; the default process group must be initialised first."""

    def __init__(self) -> None:
        """Use the default process group; raises `RuntimeError` if it is not initialised."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistCommunicator needs torch.distributed.init_process_group() to be called first")
        super().__init__(rank=dist.get_rank(), world_size=dist.get_world_size())
        # A group of K-FAC's own for the whole world: its collectives never interleave with the user's (DDP's
        # gradient allreduce runs on the default group while K-FAC reduces factors from backward hooks).
        world = dist.new_group(ranks=list(self.world)) if self.world_size > 1 else dist.group.WORLD
        self._groups: dict[Group, Any] = {self.world: world}

    def _new_group(self, group: Group) -> None:
        self._groups[group] = dist.new_group(ranks=list(group))

    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._groups[group], async_op=True)
        return WorkHandle(work)

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        work = dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=self._groups[group], async_op=True)
        return WorkHandle(work)

    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        return WorkHandle(dist.broadcast(tensor, src=src, group=self._groups[group], async_op=True))

    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        # A list of row views of `out`: works on every backend and torch version, without the deprecated
        # tensor variants.
        rows = list(out.unbind(0))
        return WorkHandle(dist.all_gather(rows, tensor, group=self._groups[group], async_op=True))

    def _gather_strings(self, value: str) -> list[str]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return [str(v) for v in gathered]

    def _barrier(self) -> None:
        dist.barrier()
