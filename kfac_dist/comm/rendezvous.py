"""`StoreRendezvous`: `Communicator.rendezvous` over a shared key-value store (torch.distributed's ``Store``).

A rendezvous checks that every rank makes a call before a collective runs, without running a collective, so a
call made on some ranks only fails on those ranks after a timeout and leaves the others undisturbed.

Protocol of this rank's ``n``-th call named ``what`` (keys ``{prefix}{what}/{n}/...``):

1. Skip the calls already decided "abort": while ``decision`` of call ``n`` says so, ``n += 1``. This rank
   comes late to a call the others gave up on; they raised, and its own call is the next one.
2. Arrive: set ``rank{r}``, then ``add(arrived, 1)``; the rank whose add brings the count to the world size
   proposes "go" with ``compare_set(decision, "", "go")``.
3. Wait for ``decision`` until the deadline; past it, propose "abort" the same way.

``compare_set`` is atomic, so the first proposal wins and every rank that arrived at call ``n`` reads the same
decision: either all of them go on to the collective, or all of them raise `RendezvousTimeout`. Every rank then
counts call ``n`` as made, so ranks that raised and ranks that skipped meet again at call ``n + 1``.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from kfac_dist.comm.base import RendezvousTimeout

_GO = "go"
_ABORT = "abort"


class StoreRendezvous:
    """Rendezvous of `world_size` ranks through `store`, under the key prefix `prefix` (the same on every rank)."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, world_size: int) -> None:
        """Use `store` (shared by every rank) for rank `rank` of `world_size`."""
        self._store = store
        self._prefix = prefix
        self._rank = rank
        self._world_size = world_size
        self._calls: dict[str, int] = {}

    def arrive(self, what: str, timeout: float) -> None:
        """Make the next call `what`; raise `RendezvousTimeout` unless every rank makes it within `timeout` s."""
        store = self._store
        call = self._calls.get(what, 0)
        while self._decision(what, call) == _ABORT.encode():
            call += 1
        self._calls[what] = call + 1
        key = f"{self._prefix}{what}/{call}/"
        store.set(f"{key}rank{self._rank}", "1")
        if store.add(f"{key}arrived", 1) == self._world_size:
            store.compare_set(f"{key}decision", "", _GO)
        try:
            store.wait([f"{key}decision"], timedelta(seconds=timeout))
            decision = store.get(f"{key}decision")
        except dist.DistStoreError:  # the deadline passed: propose "abort"; a "go" that came first wins
            decision = store.compare_set(f"{key}decision", "", _ABORT)
        if decision != _GO.encode():
            missing = [r for r in range(self._world_size) if not store.check([f"{key}rank{r}"])]
            raise RendezvousTimeout(what, missing, timeout)

    def _decision(self, what: str, call: int) -> bytes | None:
        key = f"{self._prefix}{what}/{call}/decision"
        return self._store.get(key) if self._store.check([key]) else None
