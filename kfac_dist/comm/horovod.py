"""`HorovodCommunicator`: collectives over ``horovod.torch``.

Launch with ``horovodrun -np W -H localhost:W --gloo python train.py`` (or ``mpirun`` with an MPI build of
Horovod); no ``torch.distributed`` process group is needed::

    from kfac_dist.comm.horovod import HorovodCommunicator

    pre = KFACPreconditioner(model, communicator=HorovodCommunicator())

Horovod is initialised with dynamic process sets (``hvd.init(process_sets="dynamic")``) unless the application
initialised it already; K-FAC's groups then become process sets, added collectively on every rank in the order
`create_groups` gives them. An application that initialises Horovod itself must either pass
``process_sets="dynamic"`` or pass every group K-FAC needs as a static process set (``pre.plan()`` lists them).

Horovod matches collectives across ranks by name, not by call order, so every operation gets a name that is the
same on every member: the communicator's instance number (communicators are created in the same order on every
rank), the group and the group's operation count. Horovod fuses operations that are in flight together into one
buffer (``HOROVOD_FUSION_THRESHOLD``, ``HOROVOD_CYCLE_TIME``) on top of kfac-dist's own buckets.

Horovod has no reduce. `reduce` runs the algorithm the byte accounting charges for a reduce (a reduce-scatter,
then a gather of the reduced chunks to the root), as a Horovod ``reducescatter`` followed by an ``alltoall`` in
which every member sends its chunk to the root only; so the bytes recorded for a reduce are the bytes moved, and
the closed form of :mod:`kfac_dist.costs` holds unchanged. The ``alltoall`` is launched as soon as the
``reducescatter`` has finished, from any `Handle.wait` or `Handle.is_completed` call on this communicator, so it
never waits for the caller to wait on that particular reduce.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from kfac_dist.comm.backends import BACKENDS
from kfac_dist.comm.base import Communicator, Group, Handle

try:
    import horovod.torch as hvd
    from horovod.common.process_sets import _temp_process_set_object
    from horovod.torch.mpi_ops import _basics
except ImportError as error:  # pragma: no cover - exercised only where Horovod is missing
    raise ImportError("HorovodCommunicator needs horovod.torch (scripts/install_horovod.sh builds it)") from error

_INSTANCES = itertools.count()
_POLL_S = 1e-4  # between polls of a handle that is not ready: Horovod's cycle time is 1 ms or more
# The dtypes horovod.torch handles; other floats are summed in float32, and any dtype is broadcast and gathered
# unchanged through a view as an integer type of its size.
_SUPPORTED = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# The process sets of this process's communicators, by group (Horovod refuses to add a set twice).
_PROCESS_SETS: dict[Group, Any] = {}


def _process_set(group: Group) -> Any:
    """The Horovod process set of `group`: one passed at ``hvd.init``, one added earlier, or a new one.

    Collective over the world when the set is new (every rank adds it, members or not, in the same order).
    """
    if group not in _PROCESS_SETS:
        # Sets passed at hvd.init(process_sets=[...]): Horovod lists them only through its internal table.
        existing = {tuple(ranks): ps_id for ps_id, ranks in _basics._get_process_set_ids_and_ranks().items()}
        if group in existing:
            _PROCESS_SETS[group] = _temp_process_set_object(existing[group])
        elif os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1":
            _PROCESS_SETS[group] = hvd.add_process_set(list(group))
        else:
            raise RuntimeError(
                f"Horovod has no process set {list(group)}: initialise it with hvd.init(process_sets='dynamic') "
                "or pass every group of pre.plan() as a static process set"
            )
    return _PROCESS_SETS[group]


def _for_reduction(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or a float32 copy of a floating-point tensor Horovod cannot sum (bfloat16)."""
    if tensor.dtype in _SUPPORTED:
        return tensor
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"HorovodCommunicator cannot sum {tensor.dtype} tensors")
    return tensor.to(torch.float32)


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or a view of its memory as an integer type of the same size, for Horovod to move."""
    return tensor if tensor.dtype in _SUPPORTED else tensor.view(_SAME_SIZE_INT[tensor.element_size()])


class HorovodHandle(Handle):
    """A `Handle` around a Horovod handle; `finish` receives the operation's output once it completed."""

    def __init__(self, comm: HorovodCommunicator, handle: int, finish: Callable[[Any], object] | None = None) -> None:
        """Wrap `handle` of an operation started on `comm`."""
        self._comm = comm
        self._handle: int | None = handle
        self._finish = finish

    def wait(self) -> None:
        """Wait for the operation (driving this communicator's pending reduces meanwhile), then finish it."""
        if self._handle is None:
            return
        self._comm.drive_until(lambda: hvd.poll(self._handle))
        handle, self._handle = self._handle, None
        output = hvd.synchronize(handle)
        if self._finish is not None:
            self._finish(output)

    def is_completed(self) -> bool:
        """Whether the operation finished."""
        self._comm.progress()
        return self._handle is None or bool(hvd.poll(self._handle))


class _Reduce:
    """A reduce in two phases: a reduce-scatter, then an alltoall that gathers the reduced chunks to the root."""

    def __init__(self, tensor: torch.Tensor, root: int, size: int, process_set: Any, name: str, is_root: bool) -> None:
        """Start the reduce-scatter of `tensor` over `process_set`; `root` is the root's index in the set."""
        self._tensor = tensor
        self._root = root
        self._size = size
        self._process_set = process_set
        self._name = name
        self._is_root = is_root
        flat = _for_reduction(tensor.view(-1))
        self._scatter: int | None = hvd.reducescatter_async(
            flat, name=f"{name}.rs", op=hvd.Sum, process_set=process_set
        )
        self._gather: int | None = None

    def advance(self) -> bool:
        """Launch the gather once the reduce-scatter finished; whether that happened (now or before)."""
        if self._scatter is not None:
            if not hvd.poll(self._scatter):
                return False
            chunk = hvd.synchronize(self._scatter)
            self._scatter = None
            splits = torch.zeros(self._size, dtype=torch.int32)
            splits[self._root] = chunk.shape[0]
            name = f"{self._name}.gather"
            self._gather = hvd.alltoall_async(chunk, splits=splits, name=name, process_set=self._process_set)
        return True

    def done(self) -> bool:
        """Whether both phases finished."""
        return self._scatter is None and (self._gather is None or bool(hvd.poll(self._gather)))

    def finish(self) -> None:
        """Collect the gathered result (the root copies it into the tensor)."""
        if self._gather is None:
            return
        gathered, self._gather = self._gather, None
        output, _ = hvd.synchronize(gathered)
        if self._is_root:
            self._tensor.view(-1).copy_(output)


class ReduceHandle(Handle):
    """The `Handle` of a reduce: both phases run through the communicator's `progress`."""

    def __init__(self, comm: HorovodCommunicator, op: _Reduce) -> None:
        """Wrap `op`, registered as pending with `comm`."""
        self._comm = comm
        self._op = op

    def wait(self) -> None:
        """Wait for both phases, driving every pending reduce of the communicator meanwhile."""
        self._comm.drive_until(lambda: self._op.advance() and self._op.done())
        self._op.finish()

    def is_completed(self) -> bool:
        """Whether both phases finished."""
        self._comm.progress()
        return self._op.done()


class HorovodCommunicator(Communicator):
    """The `Communicator` over ``horovod.torch`` (initialised here with dynamic process sets if needed)."""

    def __init__(self) -> None:
        if not hvd.is_initialized():
            hvd.init(process_sets="dynamic")
        super().__init__(rank=hvd.rank(), world_size=hvd.size(), devices=BACKENDS["horovod"].devices, name="horovod")
        self._sets: dict[Group, Any] = {self.world: hvd.global_process_set}
        self._prefix = f"kfac{next(_INSTANCES)}"
        self._counts: dict[Group, int] = {}
        self._reduces: list[_Reduce] = []

    def progress(self) -> None:
        """Launch the gather phase of every pending reduce whose reduce-scatter finished."""
        self._reduces = [op for op in self._reduces if not op.advance()]

    def drive_until(self, ready: Callable[[], bool]) -> None:
        """Keep pending reduces moving until `ready()` holds."""
        while True:
            self.progress()
            if ready():
                return
            time.sleep(_POLL_S)

    def _name(self, op: str, group: Group) -> str:
        count = self._counts.get(group, 0)
        self._counts[group] = count + 1
        return f"{self._prefix}.{op}.{'-'.join(map(str, group))}.{count}"

    def _new_group(self, group: Group) -> None:
        self._sets[group] = _process_set(group)

    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        name = self._name("allreduce", group)
        work = _for_reduction(tensor)
        handle = hvd.allreduce_async_(work, name=name, op=hvd.Sum, process_set=self._sets[group])
        return HorovodHandle(self, handle, None if work is tensor else lambda summed: tensor.copy_(summed))

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        name = self._name("reduce", group)
        op = _Reduce(tensor, group.index(dst), len(group), self._sets[group], name, self.rank == dst)
        self._reduces.append(op)
        return ReduceHandle(self, op)

    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        # root_rank is a global rank: Horovod translates it to the process set's own numbering.
        name = self._name("broadcast", group)
        handle = hvd.broadcast_async_(_as_bits(tensor), root_rank=src, name=name, process_set=self._sets[group])
        return HorovodHandle(self, handle)

    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        # Horovod concatenates along dim 0 in the process set's rank order (increasing global ranks).
        name = self._name("allgather", group)
        handle = hvd.allgather_async(_as_bits(tensor).unsqueeze(0), name=name, process_set=self._sets[group])
        return HorovodHandle(self, handle, lambda gathered: _as_bits(out).copy_(gathered))

    def _gather_strings(self, value: str) -> list[str]:
        gathered = hvd.allgather_object(value, name=self._name("strings", self.world))
        return [str(v) for v in gathered]

    def _barrier(self) -> None:
        hvd.barrier()
