"""Tensor fusion: many small tensors travel in a few flat buckets, launched while the caller still makes them.

A `FusionPlan` is the bucket layout: plain data, built deterministically from an ordered list of entries
(`FusionEntry`: key, shape, symmetric?, `Target`), so every rank that builds it from the same list gets the
same plan. Entries with the same `Target` (same collective, root, group and averaging) share buckets of at
most `bucket_cap_mb` MiB; an entry larger than the cap gets a bucket of its own.

A `FusionStep` runs one plan once: `add` copies tensors into their buckets (symmetric entries as packed upper
triangles when the plan says so) and launches every bucket that is ready, `flush` launches the rest, `wait`
returns the results.

Launch-order rule (what keeps ranks from deadlocking): a rank launches the buckets it takes part in
strictly in layout order. Bucket ``i`` is launched only once it is complete on this rank (every entry this
rank supplies was added, or `flush` was called) and every bucket before it was launched. The layout is
identical on every rank, so every group sees its collectives in the same order on all its members, whatever
order `add` is called in: an unexpected order only delays launches, it never mismatches them.

Buckets are laid out in the order in which they complete when entries arrive in the order given to
`FusionPlan.build`. So list entries in their expected order of arrival (e.g. reverse registration order for
tensors made in backward hooks): then each bucket launches the moment its last entry arrives, and its
collective overlaps the rest of the work.

Because launches may be delayed on some ranks, do not start other collectives on groups a step uses between
its first `add` and its `flush`, unless `add` is called in the same order on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from kfac_dist.comm.base import Communicator, Group, Handle, canonical_group
from kfac_dist.comm.packing import pack_upper, packed_numel, unpack_upper


class CollectiveOp(str, Enum):
    """The collective a bucket runs."""

    ALLREDUCE = "allreduce"
    REDUCE = "reduce"
    BROADCAST = "broadcast"


@dataclass(frozen=True)
class Target:
    """Where an entry goes: a collective over `group`; `root` is a reduce's dst or a broadcast's src.

    `average` divides a reduction by the group size (not allowed for broadcasts).
    """

    op: CollectiveOp
    group: Group
    root: int | None = None
    average: bool = False

    def __post_init__(self) -> None:
        """Canonicalise the group and reject inconsistent targets."""
        object.__setattr__(self, "op", CollectiveOp(self.op))
        object.__setattr__(self, "group", canonical_group(self.group))
        if self.op is CollectiveOp.ALLREDUCE and self.root is not None:
            raise ValueError(f"an allreduce takes no root, got root={self.root}")
        if self.op is not CollectiveOp.ALLREDUCE and self.root is None:
            raise ValueError(f"a {self.op.value} needs a root rank")
        if self.root is not None and self.root not in self.group:
            raise ValueError(f"root rank {self.root} is not a member of group {self.group}")
        if self.average and self.op is CollectiveOp.BROADCAST:
            raise ValueError("a broadcast cannot average")


@dataclass(frozen=True)
class FusionEntry:
    """One tensor of a step: its `key`, `shape`, `target`, and whether it is symmetric.

    A symmetric entry has shape ``(n, n)`` or ``(b, n, n)`` (b stacked symmetric blocks).
    """

    key: str
    shape: tuple[int, ...]
    target: Target
    symmetric: bool = False

    def __post_init__(self) -> None:
        """Reject empty entries and symmetric entries that are not square."""
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if math.prod(self.shape) == 0:
            raise ValueError(f"entry {self.key!r} has no elements (shape {self.shape})")
        if self.symmetric and (len(self.shape) not in (2, 3) or self.shape[-1] != self.shape[-2]):
            raise ValueError(f"symmetric entry {self.key!r} must have shape (n, n) or (b, n, n), got {self.shape}")


@dataclass(frozen=True)
class Slot:
    """Where an entry lives in its bucket: elements ``[offset, offset + numel)``, packed if `packed`."""

    key: str
    shape: tuple[int, ...]
    packed: bool
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """A flat buffer of `numel` elements holding `slots`, sent by one collective to `target`."""

    target: Target
    slots: tuple[Slot, ...]
    numel: int


@dataclass(frozen=True)
class FusionPlan:
    """The bucket layout of a step, in launch order, with the element type of the buffers."""

    buckets: tuple[Bucket, ...]
    dtype: torch.dtype

    @classmethod
    def build(
        cls,
        entries: Sequence[FusionEntry],
        *,
        bucket_cap_mb: float = 25.0,
        dtype: torch.dtype = torch.float32,
        symmetric_comm: bool = True,
    ) -> FusionPlan:
        """Lay out `entries` (in their expected order of arrival) into buckets of at most `bucket_cap_mb` MiB.

        Symmetric entries take ``n (n + 1) / 2`` elements per block when `symmetric_comm` is true.
        """
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        cap = max(1, int(bucket_cap_mb * 2**20) // torch.empty((), dtype=dtype).element_size())
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"fusion entries repeat keys: {sorted({k for k in keys if keys.count(k) > 1})}")
        open_buckets: dict[Target, list[Slot]] = {}
        last: dict[Target, int] = {}  # position (in `entries`) of the last entry of each open bucket
        closed: list[tuple[int, Target, list[Slot]]] = []
        for position, entry in enumerate(entries):
            target = entry.target
            packed = entry.symmetric and symmetric_comm
            numel = _packed_size(entry.shape) if packed else math.prod(entry.shape)
            slots = open_buckets.setdefault(target, [])
            used = slots[-1].offset + slots[-1].numel if slots else 0
            if slots and used + numel > cap:
                closed.append((last[target], target, slots))
                slots = open_buckets[target] = []
                used = 0
            slots.append(Slot(entry.key, entry.shape, packed, used, numel))
            last[target] = position
        closed.extend((last[t], t, s) for t, s in open_buckets.items())
        closed.sort(key=lambda item: item[0])  # launch order = order of completion
        buckets = tuple(Bucket(t, tuple(s), s[-1].offset + s[-1].numel) for _, t, s in closed)
        return cls(buckets=buckets, dtype=dtype)


class FusionStep:
    """One run of a `FusionPlan` on this rank: `add` tensors, `flush`, then `wait` for the results.

    A step is used once; build a new one for the next step. Tensors are copied (and cast to the plan's dtype)
    into buffers on `device`, so the caller may reuse them right after `add`.
    """

    def __init__(
        self, plan: FusionPlan, comm: Communicator, *, category: str, device: torch.device | str = "cpu"
    ) -> None:
        """Allocate this rank's buckets of `plan`; bytes are counted under `category` on `comm`.

        Buckets at the head of the layout that need nothing from this rank are launched right away.
        """
        self._comm = comm
        self._category = category
        rank = comm.rank
        self._mine = [b for b in plan.buckets if rank in b.target.group]
        self._buffers = [torch.zeros(b.numel, dtype=plan.dtype, device=device) for b in self._mine]
        self._pending: list[set[str]] = [
            {s.key for s in b.slots} if _supplies(b.target, rank) else set() for b in self._mine
        ]
        self._where = {s.key: (i, s) for i, b in enumerate(self._mine) for s in b.slots}
        self._handles: list[Handle] = []
        self._done = False
        self._launch_ready()  # leading buckets that need nothing from this rank (broadcasts it receives)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Copy `tensor` into its bucket, then launch every bucket that is ready (see the module's rule)."""
        self._check_open()
        if key not in self._where:
            raise KeyError(f"{key!r} is not an entry of this fusion plan that rank {self._comm.rank} takes part in")
        index, slot = self._where[key]
        target = self._mine[index].target
        if not _supplies(target, self._comm.rank):
            raise ValueError(f"rank {self._comm.rank} receives {key!r} from rank {target.root}; only the src adds it")
        if key not in self._pending[index]:
            raise ValueError(f"{key!r} was already added, or flushed")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, the plan says {slot.shape}")
        segment = self._buffers[index][slot.offset : slot.offset + slot.numel]
        segment.copy_(pack_upper(tensor) if slot.packed else tensor.reshape(-1))
        self._pending[index].discard(key)
        self._launch_ready()

    def flush(self) -> list[str]:
        """Launch every bucket not launched yet; entries never added are sent as zeros.

        Returns the keys this rank should have supplied but did not add, in layout order.
        """
        self._check_open()
        absent = [s.key for i, b in enumerate(self._mine) for s in b.slots if s.key in self._pending[i]]
        for keys in self._pending:
            keys.clear()
        self._launch_ready()
        return absent

    def wait(self) -> dict[str, torch.Tensor]:
        """Wait for every bucket and return the results that are valid on this rank, by key.

        Valid results: every member's for allreduces and broadcasts, the dst's for reduces. Symmetric entries
        come back as full symmetric matrices. Call `flush` first if some bucket may still be unlaunched.
        """
        self._check_open()
        if len(self._handles) < len(self._mine):
            raise RuntimeError("wait() before every bucket was launched: call flush() first")
        self._done = True
        results: dict[str, torch.Tensor] = {}
        for bucket, buffer, handle in zip(self._mine, self._buffers, self._handles, strict=True):
            handle.wait()
            if bucket.target.op is CollectiveOp.REDUCE and bucket.target.root != self._comm.rank:
                continue
            for slot in bucket.slots:
                segment = buffer[slot.offset : slot.offset + slot.numel]
                results[slot.key] = _unpack(segment, slot.shape) if slot.packed else segment.view(slot.shape)
        return results

    def _launch_ready(self) -> None:
        while len(self._handles) < len(self._mine) and not self._pending[len(self._handles)]:
            index = len(self._handles)
            target, buffer = self._mine[index].target, self._buffers[index]
            if target.op is CollectiveOp.ALLREDUCE:
                handle = self._comm.allreduce(buffer, target.group, average=target.average, category=self._category)
            elif target.op is CollectiveOp.REDUCE:
                assert target.root is not None
                handle = self._comm.reduce(
                    buffer, target.root, target.group, average=target.average, category=self._category
                )
            else:
                assert target.root is not None
                handle = self._comm.broadcast(buffer, target.root, target.group, category=self._category)
            self._handles.append(handle)

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this FusionStep already finished; build a new one for the next step")


def _supplies(target: Target, rank: int) -> bool:
    """Whether `rank` puts data into a bucket for `target` (broadcast receivers only receive)."""
    return target.op is not CollectiveOp.BROADCAST or target.root == rank


def _packed_size(shape: tuple[int, ...]) -> int:
    return packed_numel(shape[-1], shape[0] if len(shape) == 3 else 1)


def _unpack(segment: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return unpack_upper(segment, shape[-1], shape[0] if len(shape) == 3 else None)
