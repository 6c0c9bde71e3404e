"""The `Communicator` interface: every byte kfac-dist moves between ranks goes through it.

A backend implements a handful of primitives (`_new_group`, `_allreduce`, ...). This base class does all that
is the same for every backend, so that it lives in one place: group bookkeeping, argument checks, the shortcut
for groups of size 1 (no collective at all), averaging on completion, and byte accounting.

Groups are named by their rank tuple (global ranks, e.g. ``(0, 2)``); ``None`` means the whole world. Ranks in
a group are canonicalised to increasing order, so ``(2, 0)`` and ``(0, 2)`` name the same group.

Byte accounting: every operation records, on the calling rank and under the ``category`` given to the call,
the bytes :func:`kfac_dist.comm.accounting.collective_bytes` gives for it (the bandwidth-optimal algorithms of
the alpha-beta model, exact in integers; zero for a group of one rank). ``n`` is the bytes of the tensor passed
in (for `allgather`: of each rank's tensor).

`create_groups`, `check_same`, `barrier` and `rendezvous` are control operations and are not counted.

Failures: an operation whose backend raises (a peer stopped, hung or died and the backend's timeout passed, or a
connection closed) raises `CollectiveError`, naming the operation, its category, the group and this rank, with
the backend's message. torch's backends do not say which peer was missing: the message names the group's other
ranks (for a group of two, the one other rank).

Devices: a communicator says which devices its tensors may live on (`devices`; e.g. NCCL: the current CUDA
device only). Every tensor handed to an operation is checked against it first, so a tensor on the wrong device
fails at once with a `ValueError` naming the operation, its category and both devices, instead of a hang or an
abort inside the backend. The check compares ``tensor.device`` only: it never synchronises with a device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.comm.layout import Group, canonical_group

_T = TypeVar("_T")


class Handle(ABC):
    """An asynchronous operation in flight. Its result is valid only after `wait` returned."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the operation finished (on CUDA: until its result is ordered on the current stream)."""

    @abstractmethod
    def is_completed(self) -> bool:
        """Whether the operation already finished, without blocking."""


class CompletedHandle(Handle):
    """The handle of an operation that had nothing to do (e.g. a group of one rank)."""

    def wait(self) -> None:
        """Return at once."""

    def is_completed(self) -> bool:
        """Always true."""
        return True


class PostprocessHandle(Handle):
    """Wraps a backend handle and runs `finish` exactly once, right after the backend operation completed."""

    def __init__(self, inner: Handle, finish: Callable[[], None]) -> None:
        """Wrap `inner`; `finish` runs in the first `wait`."""
        self._inner = inner
        self._finish: Callable[[], None] | None = finish

    def wait(self) -> None:
        """Wait for the backend operation, then run the post-processing step (once)."""
        self._inner.wait()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def is_completed(self) -> bool:
        """Whether the backend operation finished (the post-processing runs in `wait`)."""
        return self._inner.is_completed()


class RendezvousTimeout(RuntimeError):
    """Some ranks did not make a `Communicator.rendezvous` call within its timeout.

    Attributes:
        what: the name of the call.
        missing: the ranks that had not made it when this rank gave up (empty if they all came, too late).
        timeout: the seconds this rank waited.
        detail: the message without the name of the call, e.g. ``"rank 1 did not call it within 60 s"``.
    """

    def __init__(self, what: str, missing: Sequence[int], timeout: float, *, detail: str | None = None) -> None:
        """Describe the failed rendezvous `what`; `detail` replaces the default one (naming `missing`)."""
        self.what = what
        self.missing = list(missing)
        self.timeout = timeout
        if len(self.missing) == 1:
            late = f"rank {self.missing[0]} did not call it"
        elif self.missing:
            late = f"ranks {', '.join(map(str, self.missing))} did not call it"
        else:
            late = "not every rank called it"
        self.detail = detail if detail is not None else f"{late} within {timeout:g} s"
        super().__init__(f"{what}: {self.detail}")


class CollectiveError(RuntimeError):
    """A collective failed on this rank: the backend raised (timeout, closed connection, aborted group).

    Attributes:
        operation: what failed, e.g. ``"broadcast(category='decomposition_broadcast') over ranks (0, 1)"``.
        rank: this rank.
    """

    def __init__(self, operation: str, rank: int, group: Sequence[int], cause: BaseException) -> None:
        """Describe `operation` of `group` that failed on `rank` with `cause` (the backend's error)."""
        self.operation = operation
        self.rank = rank
        others = [r for r in group if r != rank]
        if len(others) == 1:
            peers = f"rank {others[0]} did not take part"
        else:
            peers = f"one of ranks {', '.join(map(str, others))} did not take part"
        backend = " ".join(str(cause).split())[:500]  # torch's messages span lines
        super().__init__(
            f"{operation} failed on rank {rank}: {type(cause).__name__}: {backend}. After a timeout or a closed "
            f"connection: {peers} in time (stopped, hung or died)"
        )


class _NamedHandle(Handle):
    """Turns a backend error in `wait` into a `CollectiveError` naming the operation."""

    def __init__(self, inner: Handle, operation: str, rank: int, group: Sequence[int]) -> None:
        self._inner = inner
        self._operation = operation
        self._rank = rank
        self._group = group

    def wait(self) -> None:
        try:
            self._inner.wait()
        except RuntimeError as error:
            raise CollectiveError(self._operation, self._rank, self._group, error) from error

    def is_completed(self) -> bool:
        return self._inner.is_completed()


class Communicator(ABC):
    """Collectives with byte accounting, over a fixed set of ranks.

    Every operation on a group must be called by every member of that group, in the same order on all of them.
    Operations are asynchronous: they return a `Handle`, and the tensor holds the result once `Handle.wait`
    returned. Tensors must be contiguous and on one of `devices`; results are written in place.

    Args:
        rank: this process's global rank.
        world_size: the number of ranks.
        devices: the devices tensors may live on (a device without an index stands for every index of its
            type), or None for any device.
        name: how error messages name the communicator (e.g. its backend, ``"nccl"``).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        devices: Iterable[torch.device | str] | None = None,
        name: str | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self._rank = rank
        self._world_size = world_size
        self._devices = None if devices is None else tuple(torch.device(d) for d in devices)
        if self._devices == ():
            raise ValueError("devices must name at least one device, or be None for any device")
        self.name = name or type(self).__name__
        self._known: set[Group] = {self.world}
        self._stats: dict[str, dict[str, int]] = {}

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks."""
        return self._world_size

    @property
    def devices(self) -> tuple[torch.device, ...] | None:
        """The devices tensors may live on (a device without an index: any index), or None for any device."""
        return self._devices

    @property
    def world(self) -> Group:
        """The group of all ranks."""
        return tuple(range(self._world_size))

    def create_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Create the process groups that later operations name (collective over the whole world).

        Every rank must call this with the same list in the same order, including ranks that are not members
        of some of the groups. Groups that already exist (the world, groups created by an earlier call) and
        groups of one rank (usable without being created) are skipped, so calling it again is fine.
        """
        for ranks in groups:
            group = canonical_group(ranks)
            if group[-1] >= self._world_size or group[0] < 0:
                raise ValueError(f"group {group} has ranks outside a world of size {self._world_size}")
            if len(group) > 1 and group not in self._known:
                self._new_group(group)
                self._known.add(group)

    def allreduce(
        self, tensor: torch.Tensor, group: Sequence[int] | None = None, *, average: bool, category: str
    ) -> Handle:
        """Sum (or average) `tensor` over `group`; every member holds the result after `wait`."""
        key = self._checked("allreduce", category, group, tensor)
        self._record(category, *collective_bytes("allreduce", tensor.nbytes, key, self._rank))
        if len(key) == 1:
            return CompletedHandle()
        handle = self._run("allreduce", category, key, lambda: self._allreduce(tensor, key))
        return self._averaged(handle, tensor, len(key) if average else 1)

    def reduce(
        self,
        tensor: torch.Tensor,
        dst: int,
        group: Sequence[int] | None = None,
        *,
        average: bool,
        category: str,
    ) -> Handle:
        """Sum (or average) `tensor` over `group` into global rank `dst`.

        Only `dst` holds the result after `wait`; the other ranks' tensors are left undefined.
        """
        key = self._checked("reduce", category, group, tensor, root=dst)
        self._record(category, *collective_bytes("reduce", tensor.nbytes, key, self._rank, dst))
        if len(key) == 1:
            return CompletedHandle()
        divisor = len(key) if average and self._rank == dst else 1
        handle = self._run("reduce", category, key, lambda: self._reduce(tensor, dst, key))
        return self._averaged(handle, tensor, divisor)

    def broadcast(self, tensor: torch.Tensor, src: int, group: Sequence[int] | None = None, *, category: str) -> Handle:
        """Copy `tensor` from rank `src` (a global rank) to every other member of `group`."""
        key = self._checked("broadcast", category, group, tensor, root=src)
        self._record(category, *collective_bytes("broadcast", tensor.nbytes, key, self._rank, src))
        if len(key) == 1:
            return CompletedHandle()
        return self._run("broadcast", category, key, lambda: self._broadcast(tensor, src, key))

    def allgather(
        self, tensor: torch.Tensor, group: Sequence[int] | None = None, *, category: str
    ) -> tuple[Handle, torch.Tensor]:
        """Gather `tensor` from every member of `group`.

        Returns the handle and a new tensor of shape ``(len(group), *tensor.shape)`` whose row ``i`` holds the
        tensor of the ``i``-th rank of the (increasing) group, valid after `wait`.
        """
        key = self._checked("allgather", category, group, tensor)
        self._record(category, *collective_bytes("allgather", tensor.nbytes, key, self._rank))
        if len(key) == 1:
            return CompletedHandle(), tensor.unsqueeze(0).clone()
        out = tensor.new_empty((len(key), *tensor.shape))
        return self._run("allgather", category, key, lambda: self._allgather(tensor, out, key)), out

    def check_same(self, obj_digest: str, what: str) -> None:
        """Check that every rank passed the same `obj_digest` (collective over the whole world).

        Raises `RuntimeError` on every rank if any rank's digest differs from rank 0's, naming those ranks,
        e.g. ``rank 2 has a different plan fingerprint than rank 0: 'ab12' != 'cd34'``.
        """
        digests = self._blocking(f"check_same({what})", lambda: self._gather_strings(obj_digest))
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if len(bad) == 1:
            raise RuntimeError(
                f"rank {bad[0]} has a different {what} than rank 0: {digests[bad[0]]!r} != {digests[0]!r}"
            )
        if bad:
            details = "; ".join(f"rank {r}: {digests[r]!r}" for r in [*bad, 0])
            raise RuntimeError(f"ranks {', '.join(map(str, bad))} have a different {what} than rank 0: {details}")

    def gather_strings(self, value: str) -> list[str]:
        """Gather one string from every rank (collective over the whole world, blocking), indexed by rank."""
        return self._blocking("gather_strings", lambda: self._gather_strings(value))

    def barrier(self) -> None:
        """Block until every rank reached this call."""
        self._blocking("barrier", self._barrier)

    def rendezvous(self, what: str, timeout: float) -> None:
        """Check, without a collective, that every rank makes this call `what` within `timeout` seconds.

        A guard for an operation that a user might run on some ranks only (e.g. ``state_dict()`` under
        ``if rank == 0``): the ranks that call it raise `RendezvousTimeout` once `timeout` seconds passed without
        every rank arriving, instead of blocking in a collective forever, and the ranks that did not call it are
        left undisturbed (nothing is posted to their process groups). Calls are numbered per `what`; a call
        that timed out is skipped by ranks that reach it later, so a later call made by every rank succeeds.

        Backends with a shared key-value store check (torch.distributed: its store); the others (MPI, Horovod)
        return at once, and a collective that follows blocks as it would have without the guard.
        """
        if not timeout > 0:
            raise ValueError(f"the timeout of rendezvous {what!r} must be > 0 seconds; got {timeout!r}")
        if self._world_size > 1:
            self._rendezvous(what, timeout)

    def stats(self) -> dict[str, dict[str, int]]:
        """Bytes moved by this rank since `reset_stats`: ``{category: {"sent": .., "received": ..}}``."""
        return {cat: dict(counts) for cat, counts in self._stats.items()}

    def reset_stats(self) -> None:
        """Forget all byte counts."""
        self._stats.clear()

    def _record(self, category: str, sent: int, received: int) -> None:
        counts = self._stats.setdefault(category, {"sent": 0, "received": 0})
        counts["sent"] += sent
        counts["received"] += received

    def _checked(
        self, op: str, category: str, group: Sequence[int] | None, tensor: torch.Tensor, root: int | None = None
    ) -> Group:
        """The canonical group of an operation, after checking its arguments (before anything is recorded)."""
        self.check_device(op, category, tensor.device)
        key = self.world if group is None else canonical_group(group)
        if self._rank not in key:
            raise ValueError(f"rank {self._rank} is not a member of group {key}")
        if len(key) > 1 and key not in self._known:
            raise ValueError(f"group {key} was not created; call create_groups() on every rank first")
        if root is not None and root not in key:
            raise ValueError(f"root rank {root} is not a member of group {key}")
        if not tensor.is_contiguous():
            raise ValueError("collectives need a contiguous tensor")
        return key

    def _run(self, op: str, category: str, group: Group, start: Callable[[], Handle]) -> Handle:
        """Start an operation; its backend errors (at the start or in `wait`) become `CollectiveError`."""
        operation = f"{op}(category={category!r}) over ranks {group}"
        try:
            handle = start()
        except RuntimeError as error:
            raise CollectiveError(operation, self._rank, group, error) from error
        return _NamedHandle(handle, operation, self._rank, group)

    def _blocking(self, operation: str, call: Callable[[], _T]) -> _T:
        """Run a blocking operation over the world; its backend errors become `CollectiveError`."""
        try:
            return call()
        except RuntimeError as error:
            operation = f"{operation} over all {self._world_size} ranks"
            raise CollectiveError(operation, self._rank, self.world, error) from error

    def check_device(self, op: str, category: str, device: torch.device) -> None:
        """Raise ValueError naming the operation if this communicator cannot serve tensors on ``device``.

        Every collective checks its tensor; a fusion step whose bucket needs no collective (a group of one rank)
        checks its entries with this, so a model on the wrong device fails the same way on one rank as on many.
        """
        if self._devices is None:
            return
        for allowed in self._devices:
            if device.type == allowed.type and (allowed.index is None or device.index == allowed.index):
                return
        wanted = " or ".join(str(d) for d in self._devices)
        raise ValueError(
            f"{op}(category={category!r}): tensor on {device}, but the {self.name} communicator needs {wanted} tensors"
        )

    @staticmethod
    def _averaged(handle: Handle, tensor: torch.Tensor, divisor: int) -> Handle:
        # Reductions always SUM and divide on completion: ReduceOp.AVG is not available on every backend and
        # torch version kfac-dist supports (gloo gained it late), and dividing in `wait` keeps the call async.
        if divisor == 1:
            return handle

        def finish() -> None:
            tensor.div_(divisor)

        return PostprocessHandle(handle, finish)

    @abstractmethod
    def _new_group(self, group: Group) -> None:
        """Create the backend group for `group` (size > 1, not the world); called on every rank."""

    @abstractmethod
    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        """Start an in-place SUM allreduce over `group` (size > 1)."""

    @abstractmethod
    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        """Start an in-place SUM reduce into global rank `dst` over `group` (size > 1)."""

    @abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        """Start an in-place broadcast from global rank `src` over `group` (size > 1)."""

    @abstractmethod
    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        """Start gathering `tensor` of every member of `group` (size > 1) into the rows of `out`."""

    @abstractmethod
    def _gather_strings(self, value: str) -> list[str]:
        """Gather one string per rank over the whole world (blocking), indexed by rank."""

    @abstractmethod
    def _barrier(self) -> None:
        """Block until every rank of the world reached the barrier."""

    def _rendezvous(self, what: str, timeout: float) -> None:
        """Raise `RendezvousTimeout` unless every rank makes this call within `timeout` (world size > 1).

        This default cannot check without a collective, so it returns at once (see `rendezvous`).
        """
        return None
