"""The multi-process harness itself: results come back, and every kind of child failure fails the test."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from multiproc import MultiprocFailure, run_multiproc


def _echo(rank: int, world_size: int, offset: int) -> tuple[int, int, int, str | None, torch.Tensor]:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world_size, torch.get_num_threads() + offset, os.environ.get("KFAC_HARNESS_MARK"), t


def test_results_come_back_by_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFAC_HARNESS_MARK", "set in the parent")
    results = run_multiproc(_echo, 3, 100)
    assert [r[:4] for r in results] == [(rank, 3, 101, "set in the parent") for rank in range(3)]
    assert all(torch.equal(r[4], torch.tensor([0.0 + 1 + 2])) for r in results)


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise AssertionError("boom from rank 1: 41 != 42")


def test_child_assertion_fails_the_test_with_its_message() -> None:
    with pytest.raises(MultiprocFailure) as info:
        run_multiproc(_raise_on_rank_1, 2, pg_timeout=5.0)
    message = str(info.value)
    assert "first: rank 1" in message
    assert "--- rank 1: exit code 1 ---" in message
    assert "AssertionError: boom from rank 1: 41 != 42" in message
    assert "_raise_on_rank_1" in message  # the child's traceback, not just the last line


def _die_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(4))


def test_dead_child_makes_the_others_fail_within_the_group_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(MultiprocFailure) as info:
        run_multiproc(_die_on_rank_1, 3, pg_timeout=4.0)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "first: rank 1" in message
    assert "--- rank 1: exit code 3 ---" in message
    # The survivors fail by themselves (a gloo error or the collective timeout), not by being killed.
    assert "--- rank 0: exit code 1 ---" in message and "--- rank 2: exit code 1 ---" in message
    assert "all_reduce" in message or "allreduce" in message.lower()
    assert elapsed < 4.0 + 10.0


def _stuck_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)
    dist.all_reduce(torch.ones(4))


def test_stuck_peer_makes_the_others_time_out_then_it_is_killed() -> None:
    start = time.monotonic()
    with pytest.raises(MultiprocFailure) as info:
        run_multiproc(_stuck_rank_1, 2, pg_timeout=2.0)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "first: rank 0" in message
    assert "--- rank 0: exit code 1 ---" in message and "_stuck_rank_1" in message
    assert "--- rank 1: killed by the harness" in message and "in _stuck_rank_1" in message
    assert elapsed < 2.0 + 3.0 + 10.0  # group timeout + grace + start-up


def _hang(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_hanging_children_are_killed_at_the_run_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(MultiprocFailure) as info:
        run_multiproc(_hang, 2, timeout=4.0)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "--- rank 0: killed by the harness (run timeout 4 s" in message
    assert "--- rank 1: killed by the harness" in message
    assert message.count("in _hang") == 2  # each rank dumped its Python stack before being killed
    assert 4.0 <= elapsed < 8.0


def _silent_exit(rank: int, world_size: int) -> None:
    os._exit(0)


def test_exit_code_zero_without_a_result_is_a_failure() -> None:
    with pytest.raises(MultiprocFailure, match="rank 0: exit code 0 without writing a result"):
        run_multiproc(_silent_exit, 1)


def test_unpicklable_function_is_rejected_in_the_parent() -> None:
    with pytest.raises(Exception, match="pickle|Can't get local"):
        run_multiproc(lambda rank, world_size: None, 1)
