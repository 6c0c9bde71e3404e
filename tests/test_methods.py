"""The compute-method table: a new method is one ComputeMethod class and one row of METHODS, and then the options,
the step, the exchange (W = 2 on gloo, with decompositions broadcast to grad workers) and the closed-form bytes and
memory all work with it, with no other change."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner, costs
from kfac_dist.comm import TorchDistCommunicator
from kfac_dist.costs import ElementBytes
from kfac_dist.methods import METHODS, ComputeMethod, Decomposition, Field
from kfac_dist.options import KFACOptions
from kfac_dist.placement import LayerShape

STEPS = 3


class DiagonalMethod(ComputeMethod):
    """A test-only method: ``M / (diag(G) diag(A)^T + d)``, the factors' diagonals as its decomposition."""

    name = "diagonal"
    presence_field = "g_diag"

    def fields(self, shape: LayerShape) -> list[Field]:
        return [("a_diag", (shape.blocks, shape.a_side), False), ("g_diag", (shape.blocks, shape.g_side), False)]

    def decompose(
        self,
        a: torch.Tensor,
        g: torch.Tensor,
        *,
        a_diagonal: bool,
        damping: float,
        dtype: torch.dtype,
        previous: Decomposition | None = None,
    ) -> Decomposition:
        a_diag = a if a_diagonal else torch.diagonal(a, dim1=-2, dim2=-1)
        tensors = {"a_diag": a_diag.to(dtype).clone(), "g_diag": torch.diagonal(g, dim1=-2, dim2=-1).to(dtype)}
        return Decomposition(self.name, tensors)

    def terms(
        self, decomposition: Decomposition, damping: float, precision: str = "highest"
    ) -> dict[str, torch.Tensor]:
        a_diag, g_diag = decomposition.tensors["a_diag"], decomposition.tensors["g_diag"]
        return {"denominator": g_diag.unsqueeze(2) * a_diag.unsqueeze(1) + damping}

    def apply(self, terms: Mapping[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        return grad.to(terms["denominator"].dtype) / terms["denominator"]

    def decomposition_flops(self, shape: LayerShape) -> float:
        return 0.0

    def precondition_flops(self, shape: LayerShape) -> float:
        return 2.0 * shape.a_side * shape.g_side * shape.blocks


def register() -> None:
    METHODS["diagonal"] = DiagonalMethod()


@pytest.fixture
def diagonal_method() -> Iterator[None]:
    register()
    yield
    del METHODS["diagonal"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, pre: KFACPreconditioner, rank: int = 0, world_size: int = 1) -> None:
    for step in range(STEPS):
        model.zero_grad()
        x = batch(step).chunk(world_size)[rank]
        (model(x).square().sum() / len(x)).backward()  # the mean over this rank's examples
        if world_size > 1:
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)  # as DDP does
        pre.step()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


def test_unknown_method_is_refused_until_registered(diagonal_method: None) -> None:
    assert KFACOptions(compute_method="diagonal").compute_method == "diagonal"
    del METHODS["diagonal"]
    allowed = "'eigen', 'inverse', 'eigen_warm'"
    with pytest.raises(ValueError, match=f"compute_method must be one of {allowed}; got 'diagonal'"):
        KFACOptions(compute_method="diagonal")
    register()


def test_a_new_method_preconditions_as_its_formula_says(diagonal_method: None) -> None:
    torch.set_default_dtype(torch.float64)
    model = make_model()
    pre = KFACPreconditioner(model, compute_method="diagonal", damping=0.3, kl_clip=None, factor_decay=0.0)
    model.zero_grad()
    (model(batch(0)).square().sum() / 8).backward()
    raw = model[2].weight.grad.clone(), model[2].bias.grad.clone()
    pre.step()
    a, g = pre.factors()["2"]
    expected = torch.cat([raw[0], raw[1][:, None]], dim=1) / (torch.outer(g.diagonal(), a.diagonal()) + 0.3)
    assert torch.allclose(torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], dim=1), expected)
    assert pre.memory_usage()["decompositions"] == 4 * sum(  # inv_dtype float32
        METHODS["diagonal"].storage_numel(s.shape()) for s in pre._states.values()
    )


def distributed_run(rank: int, world_size: int) -> dict[str, Any]:
    register()
    torch.set_default_dtype(torch.float64)
    model = make_model()
    options = KFACOptions(compute_method="diagonal", grad_worker_fraction="hybrid-opt", kl_clip=None)
    pre = KFACPreconditioner(model, options, communicator=TorchDistCommunicator())
    train(model, pre, rank, world_size)
    shapes = [state.shape() for state in pre._states.values()]
    sizes = ElementBytes.of(options, "float64")  # float64 factors and gradients, float32 decompositions
    expected: dict[str, dict[str, int]] = {}
    for _ in range(STEPS):  # every step is a factor and an inverse step (the defaults)
        for category, counts in costs.step_bytes(pre.plan(), shapes, options, sizes=sizes)[rank].items():
            entry = expected.setdefault(category, {"sent": 0, "received": 0})
            entry["sent"] += counts["sent"]
            entry["received"] += counts["received"]
    return {
        "parameters": [p.detach().clone() for p in model.parameters()],
        "bytes": pre.comm_stats(),
        "expected_bytes": {c: v for c, v in expected.items() if v["sent"] or v["received"]},
        "memory": pre.memory_usage(),
        "expected_memory": costs.memory_bytes(pre.plan(), shapes, options, sizes=sizes)[rank],
        "grad_workers": pre.plan().grad_workers,
    }


def test_a_new_method_runs_distributed_and_its_bytes_are_planned(diagonal_method: None) -> None:
    torch.set_default_dtype(torch.float64)
    model = make_model()
    single = KFACPreconditioner(model, compute_method="diagonal", kl_clip=None)
    train(model, single)
    results = run_multiproc(distributed_run, 4)
    for rank, result in enumerate(results):
        assert result["grad_workers"] == 2, rank  # hybrid-opt at W = 4: decompositions are broadcast
        assert (
            result["bytes"]["decomposition_broadcast"]["sent"] + result["bytes"]["decomposition_broadcast"]["received"]
            > 0
        ), rank
        assert result["bytes"] == result["expected_bytes"], rank
        assert result["memory"] == result["expected_memory"], rank
        for got, want in zip(result["parameters"], model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
