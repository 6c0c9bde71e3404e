"""``state_dict()`` / ``load_state_dict()`` on some ranks only raise on those ranks instead of blocking forever.

Both are collective (each layer's factors live on its owner). KAISA's examples call ``state_dict()`` under
``if rank == 0``; here that raises a clear error on rank 0 within its timeout, the other ranks are not disturbed
(no collective was posted), and a later call made by every rank works. The agreement runs through the process
group's key-value store (kfac_dist.comm.rendezvous); its protocol is tested first on an in-process store, with
threads as ranks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import LocalCommunicator, RendezvousTimeout
from kfac_dist.comm.rendezvous import StoreRendezvous

SHORT_S = 0.5  # how long a rank waits for a rank that never comes
LONG_S = 60.0  # how long a rank waits for one that does come (an upper bound only)


def _ranks(world: int = 2) -> list[StoreRendezvous]:
    store = dist.HashStore()
    return [StoreRendezvous(store, "test/", rank, world) for rank in range(world)]


def _together(*calls: Callable[[], None]) -> list[BaseException | None]:
    """Run the calls in threads at once; what each raised (None: returned)."""
    outcomes: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as error:  # handed back to the test
            outcomes[i] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * LONG_S)
        assert not thread.is_alive(), "a rendezvous hung"
    return outcomes


def test_every_rank_arriving_passes() -> None:
    r0, r1 = _ranks()
    assert _together(lambda: r0.arrive("save", LONG_S), lambda: r1.arrive("save", LONG_S)) == [None, None]
    assert _together(lambda: r0.arrive("save", LONG_S), lambda: r1.arrive("save", LONG_S)) == [None, None]


def test_a_lone_rank_times_out_naming_the_missing_rank_and_a_later_call_of_every_rank_passes() -> None:
    r0, r1 = _ranks()
    with pytest.raises(RendezvousTimeout, match=r"^save: rank 1 did not call it within 0.5 s$") as raised:
        r0.arrive("save", SHORT_S)
    assert raised.value.missing == [1]
    # Rank 0 counts its failed call as made; rank 1 skips it (decided "abort"): they meet at the next one.
    assert _together(lambda: r0.arrive("save", LONG_S), lambda: r1.arrive("save", LONG_S)) == [None, None]


def test_a_rank_coming_alone_after_an_abort_times_out_too_then_both_meet_again() -> None:
    r0, r1 = _ranks()
    with pytest.raises(RendezvousTimeout):
        r0.arrive("save", SHORT_S)
    with pytest.raises(RendezvousTimeout, match="rank 0 did not call it"):
        r1.arrive("save", SHORT_S)  # skips call 0, waits alone at call 1
    assert _together(lambda: r0.arrive("save", LONG_S), lambda: r1.arrive("save", LONG_S)) == [None, None]


def test_different_calls_do_not_meet_and_both_ranks_raise() -> None:
    r0, r1 = _ranks()
    outcomes = _together(lambda: r0.arrive("save", SHORT_S), lambda: r1.arrive("load", SHORT_S))
    assert [type(o) for o in outcomes] == [RendezvousTimeout, RendezvousTimeout]


def test_three_ranks_name_every_missing_rank() -> None:
    r0, _, _ = _ranks(3)
    with pytest.raises(RendezvousTimeout, match=r"ranks 1, 2 did not call it"):
        r0.arrive("save", SHORT_S)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _step(model: nn.Module, pre: KFACPreconditioner, rank: int, world: int, step: int) -> None:
    generator = torch.Generator().manual_seed(10 * step + rank)
    x, y = torch.randn(5, 4, generator=generator), torch.randint(0, 3, (5,), generator=generator)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    pre.step()


def _only_rank_0_saves(rank: int, world: int) -> dict[str, object]:
    model = _model()
    pre = KFACPreconditioner(model, grad_worker_fraction=0.5)  # each layer's factors live on one rank only
    _step(model, pre, rank, world, 0)
    result: dict[str, object] = {}
    if rank == 0:  # KAISA's pattern
        start = time.monotonic()
        with pytest.raises(RuntimeError) as raised:
            pre.state_dict(timeout=2.0)
        result["error"] = str(raised.value)
        result["seconds"] = time.monotonic() - start
    dist.barrier()  # rank 1 never called state_dict(); both go on training in step
    _step(model, pre, rank, world, 1)
    state = pre.state_dict()  # a later call made by every rank works
    result["factors"] = {name: (f["A"], f["G"]) for name, f in state["factors"].items()}
    if rank == 1:
        with pytest.raises(RuntimeError) as raised:
            pre.load_state_dict(state, timeout=2.0)
        result["load_error"] = str(raised.value)
    dist.barrier()
    pre.load_state_dict(state)
    _step(model, pre, rank, world, 2)
    return result


def test_state_dict_on_rank_0_only_raises_there_and_leaves_every_rank_able_to_go_on() -> None:
    results = run_multiproc(_only_rank_0_saves, 2, timeout=180.0)  # every rank's exit code; fails on timeout
    assert results[0]["error"] == (
        "KFACPreconditioner.state_dict() is collective and must be called on every rank, as each layer's factors "
        "live on the rank that owns it, but rank 1 did not call it within 2 s. Call it on every rank and save on "
        "one: `state = pre.state_dict(); if rank == 0: torch.save(state, path)`"
    )
    assert results[0]["seconds"] < 60.0  # a bound against the old hang, not a timing
    assert "KFACPreconditioner.load_state_dict() is collective" in str(results[1]["load_error"])
    assert "rank 0 did not call it within 2 s" in str(results[1]["load_error"])
    factors = [r["factors"] for r in results]
    assert isinstance(factors[0], dict) and isinstance(factors[1], dict)
    assert len(factors[0]) == 2 and factors[0].keys() == factors[1].keys()
    for name, (a, g) in factors[0].items():
        assert torch.equal(a, factors[1][name][0]) and torch.equal(g, factors[1][name][1])


def test_timeout_must_be_positive() -> None:
    pre = KFACPreconditioner(_model(), communicator=LocalCommunicator())
    with pytest.raises(ValueError, match=r"timeout of rendezvous 'KFACPreconditioner.state_dict\(\)' must be > 0"):
        pre.state_dict(timeout=0.0)
