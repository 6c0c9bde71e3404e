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
    "Grids",
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

Grids = dict[str, list[Hyper]]


def _grids(
    sgd: tuple[float, ...], adam: tuple[float, ...], kfac_lr: tuple[float, ...], damping: tuple[float, ...]
) -> Grids:
    kfac = [{"lr": lr, "damping": d} for lr in kfac_lr for d in damping]
    return {"sgd": [{"lr": lr} for lr in sgd], "adam": [{"lr": lr} for lr in adam]} | {m: kfac for m in KFAC_METHODS}


#: Per task, each method's grid (K-FAC's damping in the task's factor scale: the autoencoder's loss is a mean over
#: 784 pixels, so its curvature is orders of magnitude smaller; docs/conventions.md). From a pilot: SGD above
#: lr 0.03 kills or blows up the CNN at batch 1,000; SGD and Adam above 3 / 0.03 stay on the autoencoder's plateau.
FULL_GRIDS: dict[str, Grids] = {
    "mnist5k_cnn": _grids((0.01, 0.03, 0.1), (3e-3, 1e-2, 3e-2), (0.03, 0.1, 0.3), (0.1, 0.3, 1.0)),
    "mnist5k_autoencoder": _grids((0.3, 1.0, 3.0), (3e-3, 1e-2, 3e-2), (0.1, 0.3), (1e-4, 1e-3, 1e-2)),
    "digits_mlp": _grids((0.03, 0.1, 0.3), (3e-3, 1e-2, 3e-2), (0.03, 0.1, 0.3), (0.1, 0.3, 1.0)),
}
#: The quick run's grids: two points per method, from inside the full grids.
QUICK_GRIDS: dict[str, Grids] = {
    "mnist5k_cnn": _grids((0.03,), (3e-3, 1e-2), (0.1,), (0.1, 0.3)),
    "mnist5k_autoencoder": _grids((1.0,), (3e-3, 1e-2), (0.1,), (1e-3, 1e-2)),
    "digits_mlp": _grids((0.1,), (3e-3, 1e-2), (0.1,), (0.3, 1.0)),
}


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
