"""Every Communicator operation: exact results and byte counts, at world size 1 (local) and 1-4 (gloo).

Byte counts are those of the accounting model (kfac_dist.comm.accounting, tested by hand in
test_comm_accounting.py): here we check that each operation records exactly that model for its op, group,
root and size, on every rank.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch
from multiproc import run_multiproc

from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator, collective_bytes

SHAPE = (2, 5)
NBYTES = 10 * 8  # float64; 80 bytes do not split evenly over 3 ranks (chunks 27, 27, 26)


def _value(rank: int, salt: int) -> torch.Tensor:
    """Integer-valued float64 data, so sums are exact in any order."""
    return torch.arange(10, dtype=torch.float64).reshape(SHAPE) + 100 * rank + salt


def _groups(world: int) -> list[tuple[int, ...]]:
    groups = [tuple(range(world))] + [(r,) for r in range(world)] + [tuple(range(0, world, 2))]
    if world > 1:
        groups.append(tuple(range(1, world, 2)))
    if world > 2:
        groups.append((world - 1, 0))  # spelt out of order: the same group as (0, world - 1)
    return groups


def check_ops(comm: Communicator) -> dict[str, dict[str, int]]:
    """Run every operation on every group this rank is in; check results and byte counts exactly."""
    rank, world = comm.rank, comm.world_size
    groups = _groups(world)
    comm.create_groups(groups)
    comm.create_groups(groups[:2])  # already known: a no-op
    expected: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})

    def count(op: str, group: tuple[int, ...], root: int | None = None) -> None:
        """Expect the model's bytes of one `op` (each op's bytes are recorded under a category of its name)."""
        sent, received = collective_bytes(op, NBYTES, group, rank, root)
        expected[op]["sent"] += sent
        expected[op]["received"] += received

    for group in groups:
        members = sorted(group)
        if rank not in members:
            continue
        g = len(members)
        for salt, average in ((1, False), (2, True)):
            t = _value(rank, salt)
            comm.allreduce(t, group, average=average, category="allreduce").wait()
            total = sum(_value(r, salt) for r in members)
            assert torch.equal(t, total / g if average else total), (group, average)
            count("allreduce", group)
        for i, dst in enumerate(members):
            average = i % 2 == 1
            t = _value(rank, 10 + i)
            comm.reduce(t, dst, group, average=average, category="reduce").wait()
            if rank == dst:
                total = sum(_value(r, 10 + i) for r in members)
                assert torch.equal(t, total / g if average else total), (group, dst, average)
            count("reduce", group, dst)
        for i, src in enumerate(members):
            t = _value(rank, 20 + i)
            comm.broadcast(t, src, group, category="broadcast").wait()
            assert torch.equal(t, _value(src, 20 + i)), (group, src)
            count("broadcast", group, src)
        handle, out = comm.allgather(_value(rank, 30), group, category="allgather")
        handle.wait()
        assert handle.is_completed()
        assert torch.equal(out, torch.stack([_value(r, 30) for r in members])), group
        count("allgather", group)

    stats = comm.stats()
    assert stats == dict(expected)
    comm.reset_stats()
    assert comm.stats() == {}
    return stats


def check_errors(comm: Communicator) -> None:
    """Misuse is rejected on the calling rank, before any collective starts."""
    rank, world = comm.rank, comm.world_size
    t = torch.zeros(3)
    other = (rank + 1) % world
    if world > 1:
        with pytest.raises(ValueError, match=f"rank {rank} is not a member of group \\({other},\\)"):
            comm.allreduce(t, (other,), average=False, category="x")
    if world > 3 and rank in (0, 1):
        with pytest.raises(ValueError, match=r"group \(0, 1\) was not created"):
            comm.allreduce(t, (0, 1), average=False, category="x")
    with pytest.raises(ValueError, match=f"root rank {world} is not a member"):
        comm.broadcast(t, world, None, category="x")
    with pytest.raises(ValueError, match="contiguous"):
        comm.allreduce(torch.zeros(3, 3).t(), None, average=False, category="x")
    with pytest.raises(ValueError, match="more than once"):
        comm.create_groups([(0, 0)])
    with pytest.raises(ValueError, match="outside a world"):
        comm.create_groups([(0, world)])
    assert comm.stats() == {}


def check_same_digest(comm: Communicator) -> None:
    """`check_same` passes on equal digests and names every rank that differs from rank 0."""
    rank, world = comm.rank, comm.world_size
    comm.check_same("ab12", "plan fingerprint")
    if world > 1:
        digest = "cd34" if rank == world - 1 else "ab12"
        message = f"rank {world - 1} has a different plan fingerprint than rank 0: 'cd34' != 'ab12'"
        with pytest.raises(RuntimeError, match=message):
            comm.check_same(digest, "plan fingerprint")
    if world > 2:
        message = "ranks 1, 2 have a different config than rank 0: rank 1: 'v1'; rank 2: 'v2'; rank 0: 'v0'"
        with pytest.raises(RuntimeError, match=message):
            comm.check_same(f"v{rank if rank in (1, 2) else 0}", "config")
    comm.barrier()


def check_async(comm: Communicator) -> None:
    """Launching returns at once; the result arrives while this rank does other work; `wait` delivers it."""
    rank, world = comm.rank, comm.world_size
    t = torch.full((1000,), float(rank))
    if rank == 1:
        time.sleep(1.0)  # rank 0 launches long before rank 1 joins
    start = time.monotonic()
    handle = comm.allreduce(t, None, average=False, category="async")
    launched_in = time.monotonic() - start
    if rank == 0:
        assert launched_in < 0.5
        assert not handle.is_completed()  # rank 1 has not joined yet
        x = torch.randn(64, 64)
        for _ in range(10):  # other work while the collective is in flight
            x = torch.tanh(x @ x)
    handle.wait()
    assert handle.is_completed()
    assert torch.equal(t, torch.full((1000,), float(sum(range(world)))))


def _worker(rank: int, world: int) -> dict[str, dict[str, int]]:
    comm = TorchDistCommunicator()
    assert (comm.rank, comm.world_size, comm.world) == (rank, world, tuple(range(world)))
    check_errors(comm)
    stats = check_ops(comm)
    check_same_digest(comm)
    if world > 1:
        check_async(comm)
    return stats


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_torch_dist_ops(world: int) -> None:
    stats = run_multiproc(_worker, world)
    # Bytes are conserved: what some ranks send, the others receive.
    for category in ("reduce", "broadcast", "allgather", "allreduce"):
        sent = sum(s[category]["sent"] for s in stats)
        received = sum(s[category]["received"] for s in stats)
        assert sent == received, category
    if world == 4:  # spot values by hand: rank 0's broadcasts of 80 bytes in (0, 1, 2, 3), (0, 2) and (0, 3)
        # world, c = 20: as src 2 (80 - 20) = 120, as each of 3 receivers 80 - 20 = 60; pairs, c = 40: as src
        # 2 (80 - 40) = 80, as receiver 40.
        assert stats[0]["broadcast"]["sent"] == (120 + 3 * 60) + 2 * (80 + 40)
        # received: world 60 as src + 3 * 80 as receiver; pairs 40 as src + 80 as receiver.
        assert stats[0]["broadcast"]["received"] == (60 + 3 * 80) + 2 * (40 + 80)
    if world == 3:  # rank 1 (position 1, chunk 27 of 80) in the world group: a reduce to 1 and one to 0, 2
        assert stats[1]["reduce"] == {"sent": (80 - 27) + 2 * 80, "received": 2 * (80 - 27) + 2 * (80 - 27)}


def test_local_communicator_is_world_size_one_with_zero_bytes() -> None:
    comm = LocalCommunicator()
    assert (comm.rank, comm.world_size, comm.world) == (0, 1, (0,))
    check_errors(comm)
    stats = check_ops(comm)
    assert all(v == {"sent": 0, "received": 0} for v in stats.values())
    assert set(stats) == {"allreduce", "reduce", "broadcast", "allgather"}
    check_same_digest(comm)


def test_torch_dist_needs_an_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistCommunicator()
