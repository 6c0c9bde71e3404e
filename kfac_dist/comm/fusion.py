"""Tensor fusion: many small tensors travel in a few flat buckets, launched while the caller still makes them.

A `FusionPlan` is the bucket layout (:mod:`kfac_dist.comm.layout`, pure Python) with the dtype of the buffers:
plain data, built deterministically from an ordered list of entries (`FusionEntry`: key, shape, symmetric?,
`Target`), so every rank that builds it from the same list gets the same plan. Entries with the same `Target`
(same collective, root, group and averaging) share buckets of at most `bucket_cap_mb` MiB; an entry larger than
the cap gets a bucket of its own.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kfac_dist.comm.base import Communicator, CompletedHandle, Handle
from kfac_dist.comm.layout import (
    DEFAULT_BUCKET_CAP_MB,
    DEFAULT_SYMMETRIC_COMM,
    Bucket,
    CollectiveOp,
    FusionEntry,
    Target,
    build_buckets,
)
from kfac_dist.comm.packing import pack_upper, unpack_upper


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
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        dtype: torch.dtype = torch.float32,
        symmetric_comm: bool = DEFAULT_SYMMETRIC_COMM,
    ) -> FusionPlan:
        """Lay out `entries` (in their expected order of arrival) into buckets of at most `bucket_cap_mb` MiB.

        The layout is :func:`~kfac_dist.comm.layout.build_buckets` with the element size of `dtype`.
        """
        element_size = torch.empty((), dtype=dtype).element_size()
        buckets = build_buckets(
            entries, element_size=element_size, bucket_cap_mb=bucket_cap_mb, symmetric_comm=symmetric_comm
        )
        return cls(buckets=buckets, dtype=dtype)


class FusionStep:
    """One run of a `FusionPlan` on this rank: `add` tensors, `flush`, then `wait` for the results.

    A step is used once; build a new one for the next step. Tensors are copied (and cast to the plan's dtype)
    into buffers on `device`, so the caller may reuse them right after `add`; except in a local bucket (a group of
    this rank alone, :attr:`Bucket.local`), where nothing travels: the step keeps the tensor (cast) and `wait`
    returns it as it is, unpacked, so the caller must not modify it before `wait`.
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
        self._dtype, self._device = plan.dtype, device
        empty = torch.empty(0, dtype=plan.dtype, device=device)
        self._buffers = [
            empty if b.local else torch.zeros(b.numel, dtype=plan.dtype, device=device) for b in self._mine
        ]
        self._kept: dict[str, torch.Tensor] = {}
        self._pending: list[set[str]] = [
            {s.key for s in b.slots} if _supplies(b.target, rank) else set() for b in self._mine
        ]
        self._where = {s.key: (i, s) for i, b in enumerate(self._mine) for s in b.slots}
        self._handles: list[Handle] = []
        self._done = False
        self._launch_ready()  # leading buckets that need nothing from this rank (broadcasts it receives)

    @property
    def nbytes(self) -> int:
        """Bytes this rank holds for the step's buckets (every bucket of the plan whose group holds this rank)."""
        return sum(bucket.held_numel for bucket in self._mine) * self._buffers[0].element_size() if self._mine else 0

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
        if self._mine[index].local:
            self._comm.check_device(target.op.value, self._category, tensor.device)
            self._kept[key] = tensor.to(self._dtype)
        else:
            segment = self._buffers[index][slot.offset : slot.offset + slot.numel]
            if slot.packed and tensor.dtype == segment.dtype:
                pack_upper(tensor, out=segment)
            else:
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
            if bucket.local:
                for slot in bucket.slots:
                    kept = self._kept.pop(slot.key, None)
                    if kept is None:  # never added: zeros, as a collective would have sent
                        kept = torch.zeros(slot.shape, dtype=self._dtype, device=self._device)
                    results[slot.key] = kept
                continue
            for slot in bucket.slots:
                segment = buffer[slot.offset : slot.offset + slot.numel]
                results[slot.key] = _unpack(segment, slot.shape) if slot.packed else segment.view(slot.shape)
        return results

    def _launch_ready(self) -> None:
        while len(self._handles) < len(self._mine) and not self._pending[len(self._handles)]:
            index = len(self._handles)
            target, buffer = self._mine[index].target, self._buffers[index]
            if self._mine[index].local:
                handle: Handle = CompletedHandle()
            elif target.op is CollectiveOp.ALLREDUCE:
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


def _unpack(segment: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return unpack_upper(segment, shape[-1], shape[0] if len(shape) == 3 else None)
