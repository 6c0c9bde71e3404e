"""Tensor fusion: bucket layout, launch order, packing, absent entries, and real multi-process runs."""

from __future__ import annotations

import random

import pytest
import torch
from multiproc import run_multiproc

from kfac_dist.comm import (
    Bucket,
    CollectiveOp,
    Communicator,
    CompletedHandle,
    FusionEntry,
    FusionPlan,
    FusionStep,
    Group,
    Handle,
    LocalCommunicator,
    Target,
    TorchDistCommunicator,
    build_buckets,
    collective_bytes,
)

AR, RED, BC = CollectiveOp.ALLREDUCE, CollectiveOp.REDUCE, CollectiveOp.BROADCAST


def _cap(elements: int) -> float:
    """A bucket cap in MiB that holds `elements` float32 values."""
    return elements * 4 / 2**20


def _layout(plan: FusionPlan) -> list[list[tuple[str, int, int]]]:
    return [[(s.key, s.offset, s.numel) for s in b.slots] for b in plan.buckets]


def test_buckets_group_same_targets_respect_the_cap_and_follow_completion_order() -> None:
    world = Target(AR, (0, 1), average=True)
    to_0 = Target(RED, (1, 0), root=0)  # spelt out of order: canonicalised to (0, 1)
    entries = [
        FusionEntry("a", (40,), world),
        FusionEntry("b", (5, 6), to_0),
        FusionEntry("c", (50,), world),
        FusionEntry("d", (20,), world),  # 40 + 50 + 20 > 100: starts a new bucket
        FusionEntry("big", (150,), world),  # larger than the cap: a bucket of its own
        FusionEntry("e", (1,), Target(RED, (0, 1), root=0)),  # equal to `to_0`: joins b's bucket
    ]
    plan = FusionPlan.build(entries, bucket_cap_mb=_cap(100))
    # Ordered by the position of each bucket's last entry: [a, c] completes at c, [d] at d, [big] at big, ...
    assert _layout(plan) == [
        [("a", 0, 40), ("c", 40, 50)],
        [("d", 0, 20)],
        [("big", 0, 150)],
        [("b", 0, 30), ("e", 30, 1)],
    ]
    assert [b.numel for b in plan.buckets] == [90, 20, 150, 31]
    assert plan.buckets[3].target == Target(RED, (0, 1), root=0)
    assert FusionPlan.build(entries, bucket_cap_mb=_cap(100)) == plan  # deterministic
    assert _layout(FusionPlan.build(entries)) == [  # the default 25 MiB cap: one bucket per target
        [("a", 0, 40), ("c", 40, 50), ("d", 90, 20), ("big", 110, 150)],
        [("b", 0, 30), ("e", 30, 1)],
    ]


def test_the_layout_is_pure_and_the_cap_counts_bytes() -> None:
    # The torch-free layout FusionPlan uses: the cap is in bytes, so 8-byte elements fit half as many.
    target = Target(AR, (0, 1))
    entries = [FusionEntry(k, (30,), target) for k in "abcd"]
    assert FusionPlan.build(entries, bucket_cap_mb=_cap(60), dtype=torch.float64).buckets == build_buckets(
        entries, element_size=8, bucket_cap_mb=_cap(60)
    )
    assert [b.numel for b in build_buckets(entries, element_size=4, bucket_cap_mb=_cap(60))] == [60, 60]
    assert [b.numel for b in build_buckets(entries, element_size=8, bucket_cap_mb=_cap(60))] == [30] * 4
    with pytest.raises(ValueError, match="element_size must be >= 1"):
        build_buckets(entries, element_size=0)


def test_symmetric_entries_are_packed_when_asked() -> None:
    target = Target(AR, (0,))
    entries = [
        FusionEntry("A", (4, 4), target, symmetric=True),
        FusionEntry("S", (2, 3, 3), target, symmetric=True),
        FusionEntry("M", (4, 4), target),
    ]
    packed = FusionPlan.build(entries)
    assert _layout(packed) == [[("A", 0, 10), ("S", 10, 12), ("M", 22, 16)]]
    full = FusionPlan.build(entries, symmetric_comm=False)
    assert _layout(full) == [[("A", 0, 16), ("S", 16, 18), ("M", 34, 16)]]


def test_invalid_entries_and_targets_are_rejected() -> None:
    group = (0, 1)
    with pytest.raises(ValueError, match="an allreduce takes no root"):
        Target(AR, group, root=0)
    with pytest.raises(ValueError, match="a reduce needs a root rank"):
        Target(RED, group)
    with pytest.raises(ValueError, match="root rank 2 is not a member of group"):
        Target(BC, group, root=2)
    with pytest.raises(ValueError, match="a broadcast cannot average"):
        Target(BC, group, root=0, average=True)
    with pytest.raises(ValueError, match="more than once"):
        Target(AR, (1, 1))
    with pytest.raises(ValueError, match=r"must have shape \(n, n\) or \(b, n, n\)"):
        FusionEntry("x", (3, 4), Target(AR, group), symmetric=True)
    with pytest.raises(ValueError, match="has no elements"):
        FusionEntry("x", (0, 4), Target(AR, group))
    entry = FusionEntry("x", (3,), Target(AR, group))
    with pytest.raises(ValueError, match=r"repeat keys: \['x'\]"):
        FusionPlan.build([entry, entry])
    with pytest.raises(ValueError, match="bucket_cap_mb must be > 0"):
        FusionPlan.build([entry], bucket_cap_mb=0)


class RecordingCommunicator(Communicator):
    """Rank `rank` of a pretend world: runs no collective, records the order of launches."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self.launches: list[tuple[str, Group, int | None, int]] = []

    def _new_group(self, group: Group) -> None:
        pass

    def _allreduce(self, tensor: torch.Tensor, group: Group) -> Handle:
        self.launches.append(("allreduce", group, None, tensor.numel()))
        return CompletedHandle()

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Group) -> Handle:
        self.launches.append(("reduce", group, dst, tensor.numel()))
        return CompletedHandle()

    def _broadcast(self, tensor: torch.Tensor, src: int, group: Group) -> Handle:
        self.launches.append(("broadcast", group, src, tensor.numel()))
        return CompletedHandle()

    def _allgather(self, tensor: torch.Tensor, out: torch.Tensor, group: Group) -> Handle:
        raise NotImplementedError

    def _gather_strings(self, value: str) -> list[str]:
        raise NotImplementedError

    def _barrier(self) -> None:
        raise NotImplementedError


def test_launches_follow_layout_order_whatever_the_add_order() -> None:
    entries = [
        FusionEntry("r0", (3,), Target(RED, (0, 1, 2), root=0)),
        FusionEntry("a0", (3,), Target(AR, (0, 1, 2))),
        FusionEntry("b1", (3,), Target(BC, (0, 1), root=1)),  # rank 0 only receives: nothing to add
        FusionEntry("r1", (3,), Target(RED, (0, 1, 2), root=1)),
        FusionEntry("x", (3,), Target(AR, (1, 2))),  # rank 0 is not a member
    ]
    plan = FusionPlan.build(entries, bucket_cap_mb=_cap(3))
    expected = [
        ("reduce", (0, 1, 2), 0, 3),
        ("allreduce", (0, 1, 2), None, 3),
        ("broadcast", (0, 1), 1, 3),
        ("reduce", (0, 1, 2), 1, 3),
    ]
    # How many buckets have launched after each add: a bucket launches the moment it and every bucket before
    # it are complete on this rank; the broadcast b1 needs nothing from rank 0, so it launches right after a0.
    launch_counts = {
        ("r0", "a0", "r1"): [1, 3, 4],
        ("r0", "r1", "a0"): [1, 1, 4],
        ("r1", "a0", "r0"): [0, 0, 4],
        ("a0", "r1", "r0"): [0, 0, 4],
    }
    for order, counts in launch_counts.items():
        comm = RecordingCommunicator(0, 3)
        comm.create_groups([(0, 1), (1, 2)])
        step = FusionStep(plan, comm, category="f")
        launched = []
        for key in order:
            step.add(key, torch.ones(3))
            launched.append(len(comm.launches))
        assert comm.launches == expected, order
        assert launched == counts, order
        assert step.flush() == []
        assert set(step.wait()) == {"r0", "a0", "b1"}  # r1 is valid on rank 1 only; x is not rank 0's


def test_receiver_only_buckets_launch_at_construction() -> None:
    plan = FusionPlan.build(
        [FusionEntry("b", (3,), Target(BC, (0, 1), root=1)), FusionEntry("r", (3,), Target(AR, (0, 1)))],
        bucket_cap_mb=_cap(3),
    )
    comm = RecordingCommunicator(0, 2)
    step = FusionStep(plan, comm, category="f")
    assert comm.launches == [("broadcast", (0, 1), 1, 3)]
    with pytest.raises(ValueError, match="rank 0 receives 'b' from rank 1; only the src adds it"):
        step.add("b", torch.ones(3))
    assert step.flush() == ["r"]
    assert len(comm.launches) == 2


def test_local_step_round_trip_absent_entries_and_misuse() -> None:
    comm = LocalCommunicator()
    target = Target(AR, (0,), average=True)
    entries = [
        FusionEntry("A", (4, 4), target, symmetric=True),
        FusionEntry("S", (2, 3, 3), Target(RED, (0,), root=0), symmetric=True),
        FusionEntry("v", (5,), Target(BC, (0,), root=0)),
        FusionEntry("unused", (2, 2), target),
    ]
    plan = FusionPlan.build(entries, bucket_cap_mb=_cap(10), dtype=torch.float64)
    torch.manual_seed(0)
    x = torch.randn(4, 4, dtype=torch.float64)
    a, s, v = x + x.t(), torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s = s + s.transpose(1, 2)
    step = FusionStep(plan, comm, category="factors")
    step.add("v", v)
    step.add("A", a)
    with pytest.raises(ValueError, match="'A' was already added"):
        step.add("A", a)
    with pytest.raises(ValueError, match=r"'S' has shape \(3, 3\), the plan says \(2, 3, 3\)"):
        step.add("S", s[0])
    # a world of one sends nothing: it keeps its entries, unpacked (16 + 18 + 5 + 4 float64 elements)
    assert step.nbytes == 8 * (16 + 18 + 5 + 4) == 8 * sum(b.held_numel for b in plan.buckets)
    with pytest.raises(KeyError, match="'nope' is not an entry"):
        step.add("nope", v)
    step.add("S", s)
    with pytest.raises(RuntimeError, match="call flush"):
        step.wait()
    assert step.flush() == ["unused"]
    with pytest.raises(ValueError, match="'unused' was already added, or flushed"):
        step.add("unused", torch.ones(2, 2))
    out = step.wait()
    assert torch.equal(out["A"], a) and torch.equal(out["S"], s) and torch.equal(out["v"], v)
    assert torch.equal(out["unused"], torch.zeros(2, 2, dtype=torch.float64))
    assert all(t.dtype == torch.float64 for t in out.values())
    assert comm.stats() == {}  # nothing travels in a world of one: no collective was launched
    with pytest.raises(RuntimeError, match="already finished"):
        step.add("A", a)


def _entries(world: int) -> list[FusionEntry]:
    """A K-FAC-like step: factors allreduced and reduced to owners, stacked blocks and grads in sub-groups."""
    everyone = tuple(range(world))
    evens, odds = tuple(range(0, world, 2)), tuple(range(1, world, 2))
    entries = []
    for layer in range(5):
        n, m = 3 + layer, 2 + layer
        entries += [
            FusionEntry(f"A{layer}", (n, n), Target(AR, everyone, average=True), symmetric=True),
            FusionEntry(f"G{layer}", (m, m), Target(RED, everyone, root=layer % world, average=True), True),
            FusionEntry(f"S{layer}", (2, 3, 3), Target(RED, evens, root=evens[layer % len(evens)]), True),
            FusionEntry(f"P{layer}", (m, n), Target(BC, everyone, root=(layer + 1) % world)),
            FusionEntry(f"Q{layer}", (4,), Target(BC, odds, root=odds[-1])),
        ]
    return entries


def _tensor(entry: FusionEntry, rank: int) -> torch.Tensor:
    """Integer-valued data (sums are exact in any order), symmetric where the entry is, different per rank."""
    seed = 1000 * rank + sum(map(ord, entry.key))
    x = torch.randint(-8, 8, entry.shape, generator=torch.Generator().manual_seed(seed)).float()
    return x + x.transpose(-1, -2) if entry.symmetric else x


def _fusion_worker(rank: int, world: int, symmetric_comm: bool) -> int:
    comm = TorchDistCommunicator()
    entries = _entries(world)
    comm.create_groups([tuple(range(0, world, 2)), tuple(range(1, world, 2))])
    plan = FusionPlan.build(entries, bucket_cap_mb=_cap(40), symmetric_comm=symmetric_comm)
    comm.check_same(repr(plan), "fusion plan")
    assert len(plan.buckets) >= 8
    absent = {"A4"} | ({"G1"} if rank == 1 else set())  # A4: a layer nobody used; G1: unused on rank 1 only

    # 1. Adds in a different order on every rank, absent entries: no deadlock, exact results.
    step = FusionStep(plan, comm, category="fused")
    order = list(entries)
    random.Random(rank).shuffle(order)
    for e in order:
        supplies = e.target.op is not BC or e.target.root == rank
        if rank in e.target.group and supplies and e.key not in absent:
            step.add(e.key, _tensor(e, rank))
    assert set(step.flush()) == {e.key for e in entries if e.key in absent}
    results = step.wait()
    for e in entries:
        t = e.target
        if rank not in t.group or (t.op is RED and t.root != rank):
            assert e.key not in results
            continue
        if t.op is BC:
            assert t.root is not None
            expected = _tensor(e, t.root)
        else:
            present = [r for r in t.group if not (e.key == "A4" or (e.key == "G1" and r == 1))]
            total = sum((_tensor(e, r) for r in present), torch.zeros(e.shape))
            expected = total / len(t.group) if t.average else total
        assert torch.equal(results[e.key], expected), e.key

    # 2. Bytes: one collective per bucket this rank takes part in, of the bucket's op, group, root and size.
    mine = [b for b in plan.buckets if rank in b.target.group]
    assert comm.stats() == {"fused": _bytes(mine, rank)}
    assert step.nbytes == 4 * sum(b.held_numel for b in mine)  # buffers only for this rank's buckets

    # 3. Adds in layout order: each bucket launches (its bytes are counted at launch) the moment its last
    #    entry arrives, with the buckets after it that need nothing from this rank; long before `flush`, so
    #    their collectives overlap whatever the caller does next.
    comm.reset_stats()
    step = FusionStep(plan, comm, category="overlap")
    for index, bucket in enumerate(mine):
        for slot in bucket.slots if _supplies(bucket, rank) else ():
            step.add(slot.key, _tensor(next(e for e in entries if e.key == slot.key), rank))
        launched = index + 1
        while launched < len(mine) and not _supplies(mine[launched], rank):
            launched += 1
        assert comm.stats().get("overlap", {"sent": 0, "received": 0}) == _bytes(mine[:launched], rank)
    assert step.flush() == []
    step.wait()
    return sum(b.numel for b in plan.buckets)


def _supplies(bucket: Bucket, rank: int) -> bool:
    return bucket.target.op is not BC or bucket.target.root == rank


def _bytes(buckets: list[Bucket], rank: int) -> dict[str, int]:
    """The accounting model applied to each float32 bucket: one collective of the bucket's target."""
    sent = received = 0
    for bucket in buckets:
        t = bucket.target
        s, r = collective_bytes(t.op, bucket.numel * 4, t.group, rank, t.root)
        sent, received = sent + s, received + r
    return {"sent": sent, "received": received}


@pytest.mark.parametrize(("world", "symmetric_comm"), [(2, True), (3, True), (4, True), (3, False)])
def test_fusion_multiprocess(world: int, symmetric_comm: bool) -> None:
    sizes = run_multiproc(_fusion_worker, world, symmetric_comm)
    assert len(set(sizes)) == 1  # one plan everywhere
    full = FusionPlan.build(_entries(world), bucket_cap_mb=_cap(40), symmetric_comm=False)
    packed = FusionPlan.build(_entries(world), bucket_cap_mb=_cap(40), symmetric_comm=True)
    assert sizes[0] == sum(b.numel for b in (packed if symmetric_comm else full).buckets)
    assert sum(b.numel for b in packed.buckets) < sum(b.numel for b in full.buckets)
