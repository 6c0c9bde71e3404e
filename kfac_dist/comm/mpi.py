"""`MPICommunicator`: collectives over mpi4py, for CPU clusters and sites without NCCL.

Launch with ``mpiexec -n W python train.py`` (no ``torch.distributed`` process group is needed)::

    from mpi4py import MPI
    from kfac_dist.comm.mpi import MPICommunicator

    pre = KFACPreconditioner(model, communicator=MPICommunicator(MPI.COMM_WORLD))

Every operation is an MPI-3 non-blocking collective (``Iallreduce``, ``Ireduce``, ``Ibcast``, ``Iallgather``)
on the tensor's memory itself, through its numpy view, so nothing is copied for CPU tensors of the dtypes MPI
knows (float64, float32, the integer types, ...). Tensors MPI cannot address directly are staged through a CPU
buffer that is copied back in `Handle.wait`: CUDA tensors (MPI here is not assumed to be CUDA-aware), and
float16 / bfloat16, which are reduced in float32 (broadcast and allgather move their raw bytes unchanged).

K-FAC's collectives run on a duplicate of the communicator passed in, so they never interleave with the
application's own MPI calls on it (e.g. its gradient allreduce). Sub-groups are communicators created with
``Comm.Create`` from the world group, collectively on every rank in the order `create_groups` gives them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kfac_dist.comm.backends import BACKENDS
from kfac_dist.comm.base import Communicator, Group, Handle

try:
    from mpi4py import MPI
except ImportError as error:  # pragma: no cover - exercised only where mpi4py is missing
    raise ImportError("MPICommunicator needs mpi4py (pip install mpi4py mpich, or an MPI of the site)") from error

# Dtypes MPI can reduce through their numpy view; others are staged (see `_Staged`).
_NATIVE = {
    torch.float64,
    torch.float32,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.complex64,
    torch.complex128,
}
# Low-precision floats are summed in float32, as MPI has no portable reduction for them.
_REDUCE_AS = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class MPIHandle(Handle):
    """A `Handle` around an mpi4py request; keeps the buffers alive and copies staged results back on `wait`."""

    def __init__(self, request: Any, keep_alive: tuple[Any, ...] = (), finish: _Staged | None = None) -> None:
        """Wrap `request`; `keep_alive` holds what MPI reads or writes until the request completed."""
        self._request = request
        self._keep_alive: tuple[Any, ...] | None = keep_alive
        self._finish = finish

    def wait(self) -> None:
        """Complete the request, then copy a staged result into the caller's tensor (once)."""
        self._request.Wait()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish.copy_back()
        self._keep_alive = None

    def is_completed(self) -> bool:
        """Whether the request completed (``MPI_Test``, which also drives MPI's progress engine)."""
        return bool(self._request.Test())


class _Staged:
    """A CPU buffer MPI can address, standing in for `tensor` (a CUDA tensor or a dtype numpy/MPI cannot use)."""

    def __init__(self, tensor: torch.Tensor, reduction: bool) -> None:
        self.tensor = tensor
        dtype = _REDUCE_AS.get(tensor.dtype, tensor.dtype) if reduction else tensor.dtype
        if reduction and dtype not in _NATIVE:
            raise TypeError(f"MPICommunicator cannot sum {tensor.dtype} tensors")
        self.buffer = tensor.detach().to("cpu", dtype=dtype, copy=True)

    def copy_back(self) -> None:
        self.tensor.copy_(self.buffer)


def _direct(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in _NATIVE


def _array(tensor: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (shares its memory); low-precision floats as raw bytes."""
    flat = tensor.detach().reshape(-1)  # a view: the tensor is contiguous
    return flat.numpy() if tensor.dtype in _NATIVE else flat.view(torch.uint8).numpy()


class MPICommunicator(Communicator):
    """The `Communicator` over an mpi4py communicator (default: ``MPI.COMM_WORLD``).

    Args:
        comm: the ranks to run over; K-FAC uses a duplicate of it, so the application may keep using it.
    """

    def __init__(self, comm: Any = None) -> None:
        base = MPI.COMM_WORLD if comm is None else comm
        super().__init__(rank=base.Get_rank(), world_size=base.Get_size(), devices=BACKENDS["mpi"].devices, name="mpi")
        self._world_comm = base.Dup()
        self._world_group = self._world_comm.Get_group()
        self._comms: dict[Group, Any] = {self.world: self._world_comm}

    def _new_group(self, group: Group) -> None:
        # Comm.Create is collective over the whole world: every rank calls it, non-members get COMM_NULL.
        sub_group = self._world_group.Incl(list(group))
        comm = self._world_comm.Create(sub_group)
        sub_group.Free()
        if self.rank in group:
            self._comms[group] = comm

    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        comm = self._comms[group]
        if _direct(tensor):
            array = _array(tensor)
            return MPIHandle(comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM), (tensor, array))
        staged = _Staged(tensor, reduction=True)
        array = _array(staged.buffer)
        return MPIHandle(comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM), (array,), staged)

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        comm = self._comms[group]
        root = group.index(dst)
        staged = None if _direct(tensor) else _Staged(tensor, reduction=True)
        array = _array(tensor if staged is None else staged.buffer)
        if self.rank == dst:
            request = comm.Ireduce(MPI.IN_PLACE, array, op=MPI.SUM, root=root)
        else:
            request = comm.Ireduce(array, None, op=MPI.SUM, root=root)
            staged = None  # a non-root rank's tensor is left undefined: nothing to copy back
        return MPIHandle(request, (tensor, array), staged)

    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        comm = self._comms[group]
        staged = None if _direct(tensor) else _Staged(tensor, reduction=False)
        array = _array(tensor if staged is None else staged.buffer)
        if self.rank == src:
            staged = None  # the root's tensor is unchanged
        return MPIHandle(comm.Ibcast(array, root=group.index(src)), (tensor, array), staged)

    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        comm = self._comms[group]
        if _direct(tensor) and _direct(out):
            send, recv = _array(tensor), _array(out)
            return MPIHandle(comm.Iallgather(send, recv), (tensor, out, send, recv))
        staged = _Staged(out, reduction=False)
        send, recv = _array(tensor.detach().cpu().contiguous()), _array(staged.buffer)
        return MPIHandle(comm.Iallgather(send, recv), (send, recv), staged)

    def _gather_strings(self, value: str) -> list[str]:
        return [str(v) for v in self._world_comm.allgather(value)]

    def _barrier(self) -> None:
        self._world_comm.Barrier()
