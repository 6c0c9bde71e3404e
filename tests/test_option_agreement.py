"""Ranks that construct KFACPreconditioner with different options fail at construction, naming option and values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.agreement import describe_options, option_differences


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def construct_and_train(rank: int, world_size: int, options_by_rank: dict[int, dict[str, Any]]) -> str:
    """Construct with this rank's options; if that passes, take 3 K-FAC steps (a mismatch may hang there)."""
    model = small_model()
    try:
        pre = KFACPreconditioner(model, **options_by_rank.get(rank, {}))
    except RuntimeError as error:
        return f"RuntimeError: {error}"
    for step in range(3):
        torch.manual_seed(step)
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
        pre.step()
    return "no error"


def other_schedule(step: int) -> float:
    return 2.0


@pytest.mark.parametrize(
    ("options_of_rank_1", "expected"),
    [
        ({"damping": 0.5}, "damping (rank 0: 1.0, rank 1: 0.5)"),
        ({"kl_clip": None}, "kl_clip (rank 0: 0.001, rank 1: None)"),
        ({"factor_comm": "allreduce"}, "factor_comm (rank 0: 'owner', rank 1: 'allreduce')"),  # hung both ranks
        ({"damping": other_schedule}, "damping (rank 0: 1.0, rank 1: 2.0 (callable))"),
    ],
    ids=["damping", "kl_clip", "factor_comm", "callable-damping"],
)
def test_a_differing_option_fails_every_rank_at_construction(options_of_rank_1: dict[str, Any], expected: str) -> None:
    messages = run_multiproc(construct_and_train, 2, {1: options_of_rank_1}, timeout=90, pg_timeout=20)
    for rank, message in enumerate(messages):
        assert message.startswith("RuntimeError: K-FAC options differ between ranks: "), (rank, message)
        assert expected in message, (rank, message)


def same_schedule(step: int) -> float:
    return 0.5 if step < 10 else 0.25


def test_equal_options_and_equal_schedules_construct_and_train() -> None:
    options = {"damping": same_schedule, "kl_clip": 0.01, "factor_comm": "allreduce", "inv_dtype": torch.float64}
    assert run_multiproc(construct_and_train, 2, {0: options, 1: options}, timeout=90) == ["no error"] * 2


def test_option_differences_names_every_differing_option_and_groups_ranks() -> None:
    base: dict[str, object] = {"damping": 1, "factor_comm": "owner", "inv_dtype": torch.float32, "grad_scaler": None}
    texts = [describe_options(base) for _ in range(6)]
    assert option_differences(texts) is None
    texts[3] = describe_options({**base, "damping": 1e-3, "inv_dtype": torch.float64})
    message = option_differences(texts)
    assert message is not None
    assert "damping (5 ranks (0, 1, ...): 1.0, rank 3: 0.001)" in message, message
    assert "inv_dtype (5 ranks (0, 1, ...): torch.float32, rank 3: torch.float64)" in message, message
    assert "factor_comm" not in message, message
    assert describe_options({"damping": 1}) == describe_options({"damping": 1.0})  # the same value


def test_callables_are_compared_by_their_value_at_step_0_and_a_bad_one_is_described() -> None:
    assert describe_options({"lr": lambda step: 0.1 * (step + 1)}) == "lr=0.1 (callable)"
    assert describe_options({"lr": lambda step: -1.0}) == "lr=a callable raising ValueError at step 0"
    assert describe_options({"grad_scaler": torch.amp.GradScaler("cpu", enabled=False)}) == "grad_scaler=GradScaler"
