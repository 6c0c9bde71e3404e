"""The methods (optimizers) of the convergence benchmark, their grids and how each is built.

Two first-order baselines (SGD-momentum 0.9, Adam) and SGD-momentum 0.9 preconditioned by K-FAC in four variants,
each one option away from the benchmark's K-FAC protocol (:class:`KFACSettings`): the empirical Fisher with a fixed
damping and KL-clip (the protocol itself), the Monte Carlo ("true") Fisher, adaptive damping (the grid's damping is
its start) and no KL-clip. Every method is tuned on its own grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kfac_dist import KFACPreconditioner

__all__ = [
    "FIRST_ORDER",
    "FULL_GRIDS",
    "KFAC_METHODS",
    "METHODS",
    "MOMENTUM",
    "QUICK_GRIDS",
    "Hyper",
    "KFACSettings",
    "Method",
    "make_optimizer",
]

MOMENTUM = 0.9
Hyper = dict[str, float]


@dataclass(frozen=True)
class KFACSettings:
    """The K-FAC settings shared by every K-FAC grid point (lr and damping come from the grid).

    The benchmark's protocol (docs/BENCHMARKS.md), stated here rather than taken from the library's defaults, so
    that a change of default does not change what the benchmark measures. The decomposition period is the task's
    per batch size (:class:`~kfac_dist.app.bench.convergence_runs.Task`) unless ``inv_update_steps`` is set.
    """

    factor_update_steps: int = 10
    inv_update_steps: int | None = None
    kl_clip: float | None = 1e-3
    compute_method: str = "eigen"
    fisher: str = "empirical"
    adaptive_damping: bool = False


@dataclass(frozen=True)
class Method:
    """One optimizer of the benchmark: ``optimizer`` ("sgd": momentum 0.9, or "adam"), with K-FAC or not.

    ``kfac``: the options this variant changes from :class:`KFACSettings`; ``None`` for a first-order method.
    """

    name: str
    title: str
    optimizer: str
    kfac: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def is_kfac(self) -> bool:
        """Whether this method preconditions with K-FAC."""
        return self.kfac is not None


_METHOD_LIST = (
    Method("sgd", "SGD-momentum 0.9", "sgd"),
    Method("adam", "Adam", "adam"),
    Method("kfac", "K-FAC: empirical Fisher, fixed damping, KL-clip", "sgd", {}),
    Method("kfac_mc", "K-FAC: MC Fisher", "sgd", {"fisher": "mc"}),
    Method("kfac_adaptive", "K-FAC: adaptive damping", "sgd", {"adaptive_damping": True}),
    Method("kfac_noclip", "K-FAC: no KL-clip", "sgd", {"kl_clip": None}),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}
"""Every method, by name, in the order they run and are reported."""
FIRST_ORDER: tuple[str, ...] = tuple(m.name for m in _METHOD_LIST if not m.is_kfac)
KFAC_METHODS: tuple[str, ...] = tuple(m.name for m in _METHOD_LIST if m.is_kfac)

_KFAC_GRID = [{"lr": lr, "damping": d} for lr in (0.03, 0.1, 0.3) for d in (0.1, 0.3, 1.0)]
FULL_GRIDS: dict[str, list[Hyper]] = {
    "sgd": [{"lr": lr} for lr in (0.03, 0.1, 0.3, 1.0, 3.0)],
    "adam": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)],
} | {name: _KFAC_GRID for name in KFAC_METHODS}
QUICK_GRIDS: dict[str, list[Hyper]] = {
    "sgd": [{"lr": lr} for lr in (0.1, 0.3)],
    "adam": [{"lr": lr} for lr in (3e-3, 1e-2)],
} | {name: [{"lr": 0.1, "damping": d} for d in (0.3, 1.0)] for name in KFAC_METHODS}


def make_optimizer(
    model: nn.Module, method: Method, hyper: Hyper, kfac: KFACSettings, inv_update_steps: int
) -> tuple[torch.optim.Optimizer, KFACPreconditioner | None]:
    """The optimizer (and, for a K-FAC method, the preconditioner) of ``method`` at a grid point."""
    lr = hyper["lr"]
    if method.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if method.kfac is None:
        return optimizer, None
    options = asdict(kfac) | {"inv_update_steps": kfac.inv_update_steps or inv_update_steps} | method.kfac
    return optimizer, KFACPreconditioner(model, lr=lr, damping=hyper["damping"], **options)
