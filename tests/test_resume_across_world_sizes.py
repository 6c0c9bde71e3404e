"""A run saved on 2 ranks resumes on 1 and on 3 ranks and ends exactly where the uninterrupted run ends."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_cases import make_model
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import LocalCommunicator, TorchDistCommunicator

GLOBAL_BATCH = 12
TOTAL_STEPS = 7


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (GLOBAL_BATCH,), generator=generator
    )


def segment(rank: int, world_size: int, first: int, last: int, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Train steps [first, last) on this rank's share of each global batch, optionally from a saved state."""
    torch.set_default_dtype(torch.float64)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    comm = TorchDistCommunicator() if dist.is_initialized() else LocalCommunicator()
    pre = KFACPreconditioner(
        model,
        factor_update_steps=2,
        inv_update_steps=3,
        damping=0.05,
        factor_decay=0.8,
        inv_dtype=torch.float64,
        grad_worker_fraction="mem-opt",
        communicator=comm,
    )
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        pre.load_state_dict(saved["kfac"])
    share = GLOBAL_BATCH // world_size
    for step in range(first, last):
        x, y = batch(step)
        part = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        if world_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        pre.step()
        optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "kfac": pre.state_dict()}


def run(world_size: int, first: int, last: int, saved: dict[str, Any] | None) -> dict[str, Any]:
    if world_size == 1:
        return segment(0, 1, first, last, saved)
    results = run_multiproc(segment, world_size, first, last, saved, timeout=120)
    for other in results[1:]:  # the gathered K-FAC state is the same on every rank
        for name, entry in results[0]["kfac"]["factors"].items():
            assert torch.equal(entry["A"], other["kfac"]["factors"][name]["A"])
    return results[0]


@pytest.mark.parametrize("split_after", [3, 4])
@pytest.mark.parametrize("resume_world_size", [1, 3])
def test_checkpoint_from_two_ranks_resumes_exactly_on_another_world_size(
    split_after: int, resume_world_size: int
) -> None:
    uninterrupted = run(1, 0, TOTAL_STEPS, None)
    saved = run(2, 0, split_after, None)
    assert len(saved["kfac"]["factors"]) == 4 and len(saved["kfac"]["decompositions"]) == 4
    resumed = run(resume_world_size, split_after, TOTAL_STEPS, saved)
    for name, expected in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], expected, rtol=1e-9, atol=1e-12, msg=name)
