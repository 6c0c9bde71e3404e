"""Distributed K-FAC on real gloo processes equals one process over the concatenated batch, moves exactly the
bytes the closed form says, and holds exactly the memory the plan assigns."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_cases import (
    FACTOR_UPDATE_STEPS,
    INV_UPDATE_STEPS,
    STEPS,
    cases,
    make_model,
    max_relative_error,
    reference_parameters,
    train,
)
from multiproc import run_multiproc
from torch import nn

from kfac_dist import costs
from kfac_dist.comm import TorchDistCommunicator
from kfac_dist.costs import ElementBytes


def expected_bytes(pre: Any, rank: int) -> dict[str, dict[str, int]]:
    """Sum over the run's steps of the closed-form bytes of each step."""
    shapes = [s.shape() for s in pre._states.values()]
    total: dict[str, dict[str, int]] = {}
    for step in range(STEPS):
        traffic = costs.step_bytes(
            pre.plan(),
            shapes,
            pre.options,
            factor_step=step % FACTOR_UPDATE_STEPS == 0,
            inverse_step=step % INV_UPDATE_STEPS == 0,
            sizes=ElementBytes(factor=8, inv=8, grad=8),
        )[rank]
        for category, counts in traffic.items():
            entry = total.setdefault(category, {"sent": 0, "received": 0})
            entry["sent"] += counts["sent"]
            entry["received"] += counts["received"]
    return {c: v for c, v in total.items() if v["sent"] or v["received"]}


def expected_memory(pre: Any, rank: int) -> dict[str, int]:
    shapes = [s.shape() for s in pre._states.values()]
    return costs.memory_bytes(
        pre.plan(),
        shapes,
        pre.options,
        sizes=ElementBytes(factor=8, inv=8),
    )[rank]


def run_all_cases(rank: int, world_size: int) -> list[dict[str, Any]]:
    """Every case on this rank: parameters' error vs. one process, bytes and memory vs. the closed form."""
    torch.set_default_dtype(torch.float64)
    outcomes = []
    for case in cases(world_size):
        options = case.options()
        model = make_model()
        comm = TorchDistCommunicator()
        pre = train(model, comm, rank, world_size, options, average_grads=True)
        reference = reference_parameters(world_size, options)
        stats = {c: v for c, v in pre.comm_stats().items() if v["sent"] or v["received"]}
        outcomes.append(
            {
                "case": case,
                "error": max_relative_error([p.detach() for p in model.parameters()], reference),
                "bytes": stats,
                "expected_bytes": expected_bytes(pre, rank),
                "memory": pre.memory_usage(),
                "expected_memory": expected_memory(pre, rank),
                "factors_held": sorted(pre.factors()),
                "owned": sorted(pre.plan().layers_owned_by(rank)),
            }
        )
    return outcomes


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_equals_single_process_with_exact_bytes_and_memory(world_size: int) -> None:
    results = run_multiproc(run_all_cases, world_size, timeout=400)
    assert len(results) == world_size
    for rank, outcomes in enumerate(results):
        assert len(outcomes) == 32
        for outcome in outcomes:
            where = f"rank {rank}, {outcome['case']}"
            assert outcome["error"] < 1e-6, f"{where}: relative error {outcome['error']:.3e}"
            assert outcome["bytes"] == outcome["expected_bytes"], where
            assert outcome["memory"] == outcome["expected_memory"], where
            if outcome["case"].factor_comm == "owner":
                assert outcome["factors_held"] == outcome["owned"], where
    # the schemes really differ: MEM-OPT broadcasts gradients, COMM-OPT does not
    first = results[0]
    mem_opt = next(o for o in first if o["case"].fraction == "mem-opt")
    comm_opt = next(o for o in first if o["case"].fraction == "comm-opt")
    assert "gradient_broadcast" in mem_opt["bytes"]
    assert "gradient_broadcast" not in comm_opt["bytes"]


def run_ddp(rank: int, world_size: int, fraction: float | str) -> float:
    torch.set_default_dtype(torch.float64)
    options = {
        "grad_worker_fraction": fraction,
        "compute_method": "eigen",
        "symmetric_comm": True,
        "factor_comm": "owner",
    }
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, TorchDistCommunicator(), rank, world_size, options, average_grads=False)
    return max_relative_error([p.detach() for p in model.parameters()], reference_parameters(world_size, options))


@pytest.mark.parametrize(("world_size", "fraction"), [(2, "mem-opt"), (3, 2 / 3)])
def test_ddp_wrapped_model_gives_the_same_result(world_size: int, fraction: float | str) -> None:
    errors = run_multiproc(run_ddp, world_size, fraction, timeout=200)
    assert max(errors) < 1e-6, errors
