"""Shared pieces of the distributed tests: a small model, its data, and a training run on any communicator."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import Communicator, LocalCommunicator
from kfac_dist.options import KFACOptions

STEPS = 7
LOCAL_BATCH = 4
FACTOR_UPDATE_STEPS = 2
INV_UPDATE_STEPS = 3
#: The options every case shares; a case changes the placement and communication ones.
BASE_OPTIONS = KFACOptions(
    factor_update_steps=FACTOR_UPDATE_STEPS,
    inv_update_steps=INV_UPDATE_STEPS,
    damping=0.05,
    kl_clip=2e-3,
    factor_decay=0.8,
    inv_dtype=torch.float64,
)


def make_model() -> nn.Sequential:
    """Conv, grouped conv, conv1d-free linear head: several layer kinds and factor shapes, float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()


def global_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of every rank at ``step``."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world_size * LOCAL_BATCH, 2, 5, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (world_size * LOCAL_BATCH,), generator=generator)
    return x, y


@dataclass(frozen=True)
class Case:
    """One preconditioner configuration."""

    fraction: float | str
    compute_method: str
    symmetric_comm: bool
    factor_comm: str

    def options(self) -> dict[str, Any]:
        """Keyword arguments of KFACPreconditioner."""
        return {
            "grad_worker_fraction": self.fraction,
            "compute_method": self.compute_method,
            "symmetric_comm": self.symmetric_comm,
            "factor_comm": self.factor_comm,
        }


def cases(world_size: int) -> list[Case]:
    """Every fraction (incl. one whose f*W does not divide W) x method x packing x factor scheme."""
    uneven = {2: 0.5, 3: 2 / 3, 4: 0.75}[world_size]
    fractions: list[float | str] = ["mem-opt", "hybrid-opt", "comm-opt", uneven]
    return [Case(*c) for c in itertools.product(fractions, ("eigen", "inverse"), (True, False), ("owner", "allreduce"))]


def train(
    model: nn.Module,
    comm: Communicator,
    rank: int,
    world_size: int,
    options: dict[str, Any],
    average_grads: bool,
    data_world_size: int | None = None,
) -> KFACPreconditioner:
    """STEPS steps of SGD + K-FAC on this rank's share of each global batch (made for ``data_world_size`` ranks)."""
    pre = KFACPreconditioner(model, replace(BASE_OPTIONS, **options), lr=0.1, communicator=comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    share = LOCAL_BATCH * (data_world_size or world_size) // world_size
    for step in range(STEPS):
        x, y = global_batch(step, data_world_size or world_size)
        part = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        if average_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        pre.step()
        optimizer.step()
    return pre


def reference_parameters(world_size: int, options: dict[str, Any]) -> list[torch.Tensor]:
    """The same run in one process over the concatenated batches of ``world_size`` ranks."""
    model = make_model()
    single = {"compute_method": options["compute_method"]}
    train(model, LocalCommunicator(), 0, 1, single, average_grads=False, data_world_size=world_size)
    return [p.detach().clone() for p in model.parameters()]


def max_relative_error(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over parameters of max |p - ref| / max |ref|."""
    return max(((p - r).abs().max() / r.abs().max()).item() for p, r in zip(params, reference, strict=True))
