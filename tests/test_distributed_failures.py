"""Bad distributed set-ups fail on every rank with a message naming the cause, within a bounded time."""

from __future__ import annotations

import os
import time

import pytest
import torch
from multiproc import MultiprocFailure, run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner


def small_model(hidden: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def construct_with_model_differing_on_rank_2(rank: int, world_size: int) -> str:
    model = small_model(hidden=4 if rank == 2 else 5)
    try:
        KFACPreconditioner(model)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_rank_with_a_different_model_fails_every_rank_naming_rank_and_layer() -> None:
    messages = run_multiproc(construct_with_model_differing_on_rank_2, 3, timeout=60)
    for message in messages:
        assert "rank 2" in message, message
        assert "0: a_side=7 g_side=4" in message and "0: a_side=7 g_side=5" in message, message


def construct_with_fraction(rank: int, world_size: int, fractions: dict[int, float]) -> str:
    try:
        KFACPreconditioner(small_model(), grad_worker_fraction=fractions.get(rank, 1.0))
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_invalid_fraction_is_a_value_error_on_every_rank() -> None:
    messages = run_multiproc(construct_with_fraction, 2, {0: 1.5, 1: 1.5}, timeout=60)
    for message in messages:
        assert message.startswith("ValueError: grad_worker_fraction"), message


def test_fraction_differing_between_ranks_fails_the_option_check_on_every_rank() -> None:
    messages = run_multiproc(construct_with_fraction, 3, {1: 1 / 3}, timeout=60)
    for message in messages:
        assert message.startswith("RuntimeError: K-FAC options differ between ranks: grad_worker_fraction"), message
        assert f"ranks 0, 2: 1.0, rank 1: {1 / 3!r}" in message, message


def train_until_rank_1_dies(rank: int, world_size: int) -> None:
    model = small_model()
    pre = KFACPreconditioner(model, grad_worker_fraction="mem-opt")
    for step in range(5):
        if rank == 1 and step == 2:
            os._exit(3)
        torch.manual_seed(step * 10 + rank)
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
        pre.step()


def test_rank_that_dies_makes_every_other_rank_fail_within_the_collective_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(MultiprocFailure) as info:
        run_multiproc(train_until_rank_1_dies, 3, pg_timeout=5.0, timeout=60)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "--- rank 1: exit code 3 ---" in message
    for survivor in (0, 2):
        assert f"--- rank {survivor}: exit code 1 ---" in message  # failed by itself, not killed
    assert "kfac_dist/" in message  # inside a K-FAC collective
    assert elapsed < 5.0 + 15.0, elapsed
