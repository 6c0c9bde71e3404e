"""Bytes one rank sends and receives in one collective: the single source of kfac-dist's byte accounting.

Both sides of the accounting call :func:`collective_bytes`: the `Communicator` records its result for every
operation it runs, and :mod:`kfac_dist.costs` applies it to the same fusion buckets in closed form, so the two
agree by construction. Pure Python (no torch), exact in integers.

Model: the bandwidth term of the alpha-beta (latency-bandwidth) model of the standard bandwidth-optimal
algorithms for large messages. A message of ``n`` bytes over a group of ``g`` ranks is cut into ``g`` chunks;
the rank at position ``p`` of the sorted group owns chunk ``c_p = n // g + (1 if p < n % g else 0)`` (so the
chunks sum to ``n`` exactly). Per rank (``r`` = position of the root):

============================================ ======================= =========================
collective (algorithm)                       sent                    received
============================================ ======================= =========================
allreduce (ring reduce-scatter + allgather)  ``2 (n - c_p)``         ``2 (n - c_p)``
reduce, root (Rabenseifner: reduce-scatter   ``n - c_r``             ``2 (n - c_r)``
+ gather to the root)
reduce, every other member                   ``n``                   ``n - c_p``
broadcast, root (van de Geijn: scatter from  ``2 (n - c_r)``         ``n - c_r``
the root + allgather)
broadcast, every other member                ``n - c_p``             ``n``
allgather (``n`` bytes from every rank)      ``(g - 1) n``           ``(g - 1) n``
any collective over ``g == 1``               0                       0
============================================ ======================= =========================

Why: the reduce-scatter moves every chunk but a rank's own once in and once out (``n - c_p`` each way); the
allgather does the same; a gather to the root adds the ``c_p`` each rank reduced (``n - c_r`` in at the root);
a scatter from the root sends out every chunk but its own. So the root of a reduce receives about ``2n``, not
``(g - 1) n`` as a naive "everyone sends to the root" count would say, and an allreduce moves about twice a
reduce -- which is what reducing factors only into their owner saves over KAISA's allreduce. Bytes are
conserved exactly: over the group, total sent equals total received for every collective.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The collectives :func:`collective_bytes` knows.
COLLECTIVES = ("allreduce", "reduce", "broadcast", "allgather")


def chunk_bytes(nbytes: int, size: int, position: int) -> int:
    """Bytes of the chunk owned by the rank at `position` of a group of `size` ranks: ``c_p`` of the model."""
    return nbytes // size + (1 if position < nbytes % size else 0)


def collective_bytes(op: str, nbytes: int, group: Sequence[int], rank: int, root: int | None = None) -> tuple[int, int]:
    """``(sent, received)`` bytes of `rank` in one collective (see the module docstring for the model).

    Args:
        op: one of :data:`COLLECTIVES` (a ``CollectiveOp`` works too: it is a ``str``).
        nbytes: the message size ``n`` in bytes (for an allgather: what each rank contributes).
        group: the ranks taking part (any order; positions are taken in increasing rank order).
        rank: the rank whose bytes are counted (a member of `group`).
        root: the reduce's destination or the broadcast's source (a member of `group`); None otherwise.

    Returns:
        The bytes `rank` sends and receives.

    Raises:
        ValueError: for an unknown `op`, a negative size, or a `rank` or `root` outside `group`.
    """
    ranks = sorted(group)
    if op not in COLLECTIVES:
        raise ValueError(f"op must be one of {', '.join(COLLECTIVES)}; got {op!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0; got {nbytes}")
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not a member of group {tuple(ranks)}")
    rooted = op in ("reduce", "broadcast")
    if rooted and root not in ranks:
        raise ValueError(f"a {op} needs a root in group {tuple(ranks)}; got {root!r}")
    size = len(ranks)
    if size == 1:
        return 0, 0
    if op == "allgather":
        return (size - 1) * nbytes, (size - 1) * nbytes
    own = nbytes - chunk_bytes(nbytes, size, ranks.index(rank))  # every chunk but this rank's
    if op == "allreduce":
        return 2 * own, 2 * own
    if rank == root:
        return (own, 2 * own) if op == "reduce" else (2 * own, own)
    return (nbytes, own) if op == "reduce" else (own, nbytes)
