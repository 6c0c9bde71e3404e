"""`TorchDistCommunicator`: collectives over an initialised ``torch.distributed`` default process group.

Works with gloo (CPU tensors, and CUDA tensors, which gloo stages through the host) and NCCL (CUDA tensors of
the current device: call ``torch.cuda.set_device`` for the local rank before constructing it, as
``all_gather_object`` relies on it too). The devices are read from the default group's backend, per device type
(``cpu:gloo,cuda:nccl`` accepts both), so a tensor on a device its backend cannot serve fails at once with a
clear error. On NCCL, `Handle.wait` does not block the host: it orders the result on the current CUDA stream,
and the division of an averaged reduction is queued there too.

Timeout: K-FAC's own process groups get the default group's timeout (the ``timeout`` given to
``init_process_group``), unless the constructor is given another one; torch would give them its own default
(30 minutes for gloo) otherwise. A collective that a rank never joins (it stopped, hung or died) then fails
on the others after that long, with a `CollectiveError` naming the operation, its category and group.

`rendezvous` runs through the default group's key-value store (:mod:`kfac_dist.comm.rendezvous`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from kfac_dist.comm.base import Communicator, Group, Handle
from kfac_dist.comm.rendezvous import StoreRendezvous


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
    """The `Communicator` over ``torch.distributed``; the default process group must be initialised first.

    Raises `RuntimeError` if it is not initialised.

    Args:
        devices: the devices tensors may live on (see `Communicator`); default: those the default group's
            backends serve (:func:`backend_devices`).
        timeout: seconds after which a collective of K-FAC's groups that some member never joins fails;
            default: the default group's timeout (:func:`default_group_timeout`).
    """

    def __init__(self, *, devices: Iterable[torch.device | str] | None = None, timeout: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistCommunicator needs torch.distributed.init_process_group() to be called first")
        super().__init__(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            devices=backend_devices() if devices is None else devices,
            name=str(dist.get_backend()),
        )
        #: The timeout of K-FAC's process groups.
        self.timeout = default_group_timeout() if timeout is None else _timedelta(timeout)
        # A group of K-FAC's own for the whole world: its collectives never interleave with the user's (DDP's
        # gradient allreduce runs on the default group while K-FAC reduces factors from backward hooks).
        world = (
            dist.new_group(ranks=list(self.world), timeout=self.timeout) if self.world_size > 1 else dist.group.WORLD
        )
        assert world is not None
        self._groups: dict[Group, Any] = {self.world: world}
        # Keys under the name of K-FAC's world group: the same on every rank, unique per communicator. A group
        # made without a store (the MPI backend) has no bounded rendezvous (see Communicator.rendezvous).
        store = distributed_c10d._get_default_store()
        self._store_rendezvous = (
            None
            if store is None
            else StoreRendezvous(store, f"kfac_dist/{world.group_name}/", self.rank, self.world_size)
        )

    def _new_group(self, group: Group) -> None:
        self._groups[group] = dist.new_group(ranks=list(group), timeout=self.timeout)

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

    def _rendezvous(self, what: str, timeout: float) -> None:
        if self._store_rendezvous is not None:
            self._store_rendezvous.arrive(what, timeout)


def _timedelta(seconds: float) -> timedelta:
    try:
        if seconds > 0:
            return timedelta(seconds=seconds)
    except (OverflowError, TypeError, ValueError):
        pass
    raise ValueError(f"timeout must be a positive number of seconds (at most about 2.7 million years); got {seconds!r}")


def default_group_timeout() -> timedelta:
    """The timeout of the default process group: its gloo or NCCL backend's, else its store's.

    torch keeps it in private attributes only; where neither is readable, torch's default for the backend.
    """
    group = distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            options = group._get_backend(torch.device(device)).options
        except (RuntimeError, AttributeError, ValueError):  # no backend for this device type, or no options
            continue
        timeout = getattr(options, "_timeout", None)
        if isinstance(timeout, timedelta):
            return timeout
    store = distributed_c10d._get_default_store()
    timeout = getattr(store, "timeout", None)
    if isinstance(timeout, timedelta):
        return timeout
    return distributed_c10d._get_default_timeout(dist.get_backend())


def backend_devices() -> tuple[torch.device, ...] | None:
    """The devices the default process group's backends serve; None where a backend is not known here.

    NCCL serves the current CUDA device only; gloo serves CPU tensors and CUDA tensors of any device.
    """
    devices: list[torch.device] = []
    for part in dist.get_backend_config().lower().split(","):
        device_type, _, backend = part.rpartition(":")
        if backend == "nccl":
            devices.append(torch.device("cuda", torch.cuda.current_device()))
        elif backend == "gloo":
            devices += [torch.device(device_type)] if device_type else [torch.device("cpu"), torch.device("cuda")]
        else:
            return None
    return tuple(devices)
