"""The byte-accounting model (kfac_dist.comm.accounting): formulas by hand, conservation, edge cases."""

from __future__ import annotations

import itertools

import pytest

from kfac_dist.comm import CollectiveOp
from kfac_dist.comm.accounting import COLLECTIVES, chunk_bytes, collective_bytes


def per_rank(op: str, n: int, group: tuple[int, ...], root: int | None = None) -> dict[int, tuple[int, int]]:
    return {r: collective_bytes(op, n, group, r, root) for r in group}


def test_chunks_split_n_exactly_with_the_remainder_on_the_first_positions() -> None:
    assert [chunk_bytes(10, 3, p) for p in range(3)] == [4, 3, 3]  # 10 // 3 = 3, 10 % 3 = 1
    assert [chunk_bytes(2, 4, p) for p in range(4)] == [1, 1, 0, 0]  # fewer bytes than ranks
    assert [chunk_bytes(12, 4, p) for p in range(4)] == [3, 3, 3, 3]
    for n, g in itertools.product(range(30), range(1, 7)):
        assert sum(chunk_bytes(n, g, p) for p in range(g)) == n


def test_n_10_over_3_ranks_by_hand() -> None:
    # Group (2, 5, 7), spelt out of order: positions 0, 1, 2 own chunks c = 4, 3, 3 of n = 10 bytes.
    group = (7, 2, 5)
    # allreduce: 2 (n - c_p) each way.
    assert per_rank("allreduce", 10, group) == {2: (12, 12), 5: (14, 14), 7: (14, 14)}
    # reduce to 5 (c_r = 3): root sends n - c_r = 7, receives 2 (n - c_r) = 14; others send n, receive n - c_p.
    assert per_rank("reduce", 10, group, root=5) == {2: (10, 6), 5: (7, 14), 7: (10, 7)}
    # reduce to 2 (c_r = 4): root sends 6, receives 12.
    assert per_rank("reduce", 10, group, root=2) == {2: (6, 12), 5: (10, 7), 7: (10, 7)}
    # broadcast from 5: root sends 2 (n - c_r) = 14, receives 7; others receive n and send n - c_p.
    assert per_rank("broadcast", 10, group, root=5) == {2: (6, 10), 5: (14, 7), 7: (7, 10)}
    # allgather of 10 bytes from each of 3 ranks: (g - 1) n each way.
    assert per_rank("allgather", 10, group) == {2: (20, 20), 5: (20, 20), 7: (20, 20)}


def test_fewer_bytes_than_ranks_by_hand() -> None:
    # n = 2 over 4 ranks: c = 1, 1, 0, 0.
    group = (0, 1, 2, 3)
    assert per_rank("allreduce", 2, group) == {0: (2, 2), 1: (2, 2), 2: (4, 4), 3: (4, 4)}
    assert per_rank("reduce", 2, group, root=3) == {0: (2, 1), 1: (2, 1), 2: (2, 2), 3: (2, 4)}
    assert per_rank("broadcast", 2, group, root=0) == {0: (2, 1), 1: (1, 2), 2: (2, 2), 3: (2, 2)}


def test_two_ranks_even_and_odd() -> None:
    # g = 2, n = 52: c = 26, 26. A reduce moves half each way, then the non-root's half to the root.
    assert per_rank("reduce", 52, (0, 1), root=1) == {0: (52, 26), 1: (26, 52)}
    assert per_rank("allreduce", 52, (0, 1)) == {0: (52, 52), 1: (52, 52)}
    # n = 13: c = 7, 6.
    assert per_rank("reduce", 13, (0, 1), root=1) == {0: (13, 6), 1: (7, 14)}
    assert per_rank("broadcast", 13, (0, 1), root=0) == {0: (12, 6), 1: (7, 13)}


def test_a_group_of_one_moves_nothing() -> None:
    for op in COLLECTIVES:
        root = 3 if op in ("reduce", "broadcast") else None
        assert collective_bytes(op, 1000, (3,), 3, root) == (0, 0)


@pytest.mark.parametrize("op", COLLECTIVES)
def test_bytes_are_conserved_over_the_group(op: str) -> None:
    for n, g in itertools.product([0, 1, 2, 5, 7, 48, 1001], range(1, 7)):
        group = tuple(range(0, 2 * g, 2))
        for root in group if op in ("reduce", "broadcast") else [None]:
            counts = per_rank(op, n, group, root)
            assert sum(s for s, _ in counts.values()) == sum(r for _, r in counts.values()), (op, n, g, root)


def test_allreduce_moves_about_twice_a_reduce() -> None:
    # What owner-only factor reduction saves over KAISA's allreduce: summed over the group, a reduce moves
    # (g - 1) n + n - c_r bytes, an allreduce 2 (g - 1) n.
    n, group = 1001, tuple(range(8))
    reduce_total = sum(s for s, _ in per_rank("reduce", n, group, root=3).values())
    allreduce_total = sum(s for s, _ in per_rank("allreduce", n, group).values())
    assert reduce_total == 7 * n + n - chunk_bytes(n, 8, 3)
    assert allreduce_total == 2 * 7 * n


def test_collective_op_values_are_accepted() -> None:
    assert collective_bytes(CollectiveOp.REDUCE, 10, (0, 1, 2), 1, 1) == collective_bytes("reduce", 10, (0, 1, 2), 1, 1)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        collective_bytes("scatter", 1, (0, 1), 0)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        collective_bytes("allreduce", -1, (0, 1), 0)
    with pytest.raises(ValueError, match=r"rank 2 is not a member of group \(0, 1\)"):
        collective_bytes("allreduce", 1, (1, 0), 2)
    with pytest.raises(ValueError, match="a reduce needs a root"):
        collective_bytes("reduce", 1, (0, 1), 0)
    with pytest.raises(ValueError, match="a broadcast needs a root"):
        collective_bytes("broadcast", 1, (0, 1), 0, 5)
