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

Bounded: the whole call returns or raises within ``timeout`` seconds plus at most ``_SETTLE_S`` (for the "abort"
proposal after the deadline), even when the store itself does not answer (its host stopped): a store client
blocks on a silent server for as long as the timeout it connected with (the process group's), whatever timeout is
set later, so the calls run in a helper thread that is abandoned past the bound, and every later call fails at
once. They use a connection of their own where the store can be cloned (torch >= 2.5), so a stuck call leaves the
default store's connection alone.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from kfac_dist.comm.base import RendezvousTimeout

_GO = "go"
_ABORT = "abort"
_MIN_S = 0.001  # a store timeout of zero means "no timeout": never pass one
_SETTLE_S = 5.0  # the most seconds a call waits past its timeout (for the store's answers) before giving up on it


class StoreRendezvous:
    """Rendezvous of `world_size` ranks through `store`, under the key prefix `prefix` (the same on every rank)."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, world_size: int) -> None:
        """Use `store` (shared by every rank) for rank `rank` of `world_size`."""
        clone = getattr(store, "clone", None)
        self._store: dist.Store = clone() if clone is not None else store
        self._prefix = prefix
        self._rank = rank
        self._world_size = world_size
        self._calls: dict[str, int] = {}
        self._silent: str | None = None  # why the store is given up on, once a call got no answer in time

    def arrive(self, what: str, timeout: float) -> None:
        """Make the next call `what`; raise `RendezvousTimeout` unless every rank makes it within `timeout` s."""
        if self._silent is not None:
            raise RendezvousTimeout(what, [], timeout, detail=self._silent)
        outcome: list[BaseException | None] = []
        helper = threading.Thread(
            target=self._run, args=(what, timeout, outcome), name=f"kfac-rendezvous {what}", daemon=True
        )
        helper.start()
        helper.join(timeout + _SETTLE_S)
        if not outcome:  # still blocked on the store: leave it there
            self._silent = (
                f"the process group's key-value store did not answer within {timeout:g} s (its host, usually "
                "rank 0, stopped or is unreachable)"
            )
            raise RendezvousTimeout(what, [], timeout, detail=self._silent)
        if outcome[0] is not None:
            raise outcome[0]

    def _run(self, what: str, timeout: float, outcome: list[BaseException | None]) -> None:
        """`_arrive` in the helper thread: its error, or None, goes to `outcome`."""
        try:
            self._arrive(what, timeout)
            outcome.append(None)
        except dist.DistStoreError as error:  # the store did not answer in time: its host stopped or died
            reason = " ".join(str(error).split())[:300]
            detail = f"the process group's key-value store did not answer within {timeout:g} s ({reason})"
            outcome.append(RendezvousTimeout(what, [], timeout, detail=detail))
        except BaseException as error:  # handed to the caller's thread
            outcome.append(error)

    def _arrive(self, what: str, timeout: float) -> None:
        store = self._store
        deadline = time.monotonic() + timeout
        call = self._calls.get(what, 0)
        while self._decision(what, call) == _ABORT.encode():
            call += 1
        self._calls[what] = call + 1
        key = f"{self._prefix}{what}/{call}/"
        store.set(f"{key}rank{self._rank}", "1")
        if store.add(f"{key}arrived", 1) == self._world_size:
            store.compare_set(f"{key}decision", "", _GO)
        try:
            store.wait([f"{key}decision"], timedelta(seconds=max(deadline - time.monotonic(), _MIN_S)))
            decision = store.get(f"{key}decision")
        except dist.DistStoreError:  # the deadline passed: propose "abort"; a "go" that came first wins
            decision = store.compare_set(f"{key}decision", "", _ABORT)
        if decision != _GO.encode():
            missing = [r for r in range(self._world_size) if not store.check([f"{key}rank{r}"])]
            raise RendezvousTimeout(what, missing, timeout)

    def _decision(self, what: str, call: int) -> bytes | None:
        key = f"{self._prefix}{what}/{call}/decision"
        return self._store.get(key) if self._store.check([key]) else None
