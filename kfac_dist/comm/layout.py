"""The bucket layout of tensor fusion, as plain data: which entries share which bucket, in which order.

Pure Python (no torch), so that the closed-form accounting of :mod:`kfac_dist.costs` lays out exactly the
buckets that :class:`~kfac_dist.comm.fusion.FusionStep` sends at run time. :func:`build_buckets` is
deterministic: every rank that calls it with the same entries gets the same layout.

Groups are named by their rank tuple (global ranks, e.g. ``(0, 2)``), canonicalised to increasing order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

Group = tuple[int, ...]
"""A process group, named by the global ranks it holds."""

#: The default fusion bucket cap, in MiB, and whether symmetric entries are packed by default (``KFACOptions``').
DEFAULT_BUCKET_CAP_MB = 25.0
DEFAULT_SYMMETRIC_COMM = True


def canonical_group(ranks: Sequence[int]) -> Group:
    """Return `ranks` as an increasing tuple, rejecting an empty group and repeated ranks."""
    group = tuple(sorted(int(r) for r in ranks))
    if not group:
        raise ValueError("a group must hold at least one rank")
    if len(set(group)) != len(group):
        raise ValueError(f"group {tuple(ranks)} names a rank more than once")
    return group


def packed_numel(n: int, blocks: int = 1) -> int:
    """The number of elements of the packed upper triangles of `blocks` stacked ``(n, n)`` matrices."""
    return blocks * n * (n + 1) // 2


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

    @property
    def local(self) -> bool:
        """Whether its group is one rank: nothing travels, so a step keeps the entries as they are, unpacked."""
        return len(self.target.group) == 1

    @property
    def held_numel(self) -> int:
        """Elements a member holds for it during a step: the buffer, or for a :attr:`local` bucket its entries."""
        return sum(math.prod(slot.shape) for slot in self.slots) if self.local else self.numel


def build_buckets(
    entries: Sequence[FusionEntry],
    *,
    element_size: int,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    symmetric_comm: bool = DEFAULT_SYMMETRIC_COMM,
) -> tuple[Bucket, ...]:
    """Lay out `entries` (in their expected order of arrival) into buckets, in launch order.

    Entries with the same `Target` share buckets of at most ``max(1, int(bucket_cap_mb * 2**20) //
    element_size)`` elements, filled in entry order; an entry larger than the cap gets a bucket of its own.
    Buckets are ordered by the position of their last entry (the order in which they complete). Symmetric
    entries take ``n (n + 1) / 2`` elements per block when `symmetric_comm` is true.

    Args:
        entries: the entries, keys unique.
        element_size: bytes per element of the buckets.
        bucket_cap_mb: the bucket size cap in MiB (> 0).
        symmetric_comm: pack symmetric entries as upper triangles.

    Returns:
        The buckets, in launch order.
    """
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    if element_size < 1:
        raise ValueError(f"element_size must be >= 1, got {element_size}")
    cap = max(1, int(bucket_cap_mb * 2**20) // element_size)
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"fusion entries repeat keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    open_buckets: dict[Target, list[Slot]] = {}
    last: dict[Target, int] = {}  # position (in `entries`) of the last entry of each open bucket
    closed: list[tuple[int, Target, list[Slot]]] = []
    for position, entry in enumerate(entries):
        target = entry.target
        packed = entry.symmetric and symmetric_comm
        numel = packed_numel(entry.shape[-1], math.prod(entry.shape[:-2])) if packed else math.prod(entry.shape)
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
    return tuple(Bucket(t, tuple(s), s[-1].offset + s[-1].numel) for _, t, s in closed)
