"""`LocalCommunicator`: the world of a single process, without any process group."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kfac_dist.comm.base import Communicator, CompletedHandle, Group, Handle


class LocalCommunicator(Communicator):
    """A world of one rank: every operation completes at once, leaves tensors as they are, moves zero bytes.

    Its only group is ``(0,)``, so the base class never reaches the collective primitives below with a group
    of more than one rank; they are written out as what they mean over a single rank.

    Args:
        devices: the devices tensors may live on (default: any). E.g. ``("cuda",)`` makes a one-process run
            refuse what an NCCL run would refuse: a tensor handed to a collective that is not on the GPU.
    """

    def __init__(self, *, devices: Iterable[torch.device | str] | None = None) -> None:
        super().__init__(rank=0, world_size=1, devices=devices, name="local")

    def _new_group(self, group: Group) -> None:
        """No backend groups exist in a world of one rank."""

    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        return CompletedHandle()

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        return CompletedHandle()

    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        return CompletedHandle()

    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        out.copy_(tensor.unsqueeze(0))
        return CompletedHandle()

    def _gather_strings(self, value: str) -> list[str]:
        return [value]

    def _barrier(self) -> None:
        """Nothing to wait for."""
