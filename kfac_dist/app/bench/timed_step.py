"""One training step with every region timed: what the overhead and scaling benchmarks both measure."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist import KFACPreconditioner

__all__ = ["REGIONS", "new_regions", "timed_step"]

#: Timed regions of a step, in order, and the factor computation the hooks do inside the forward pass.
REGIONS = ("zero_grad", "forward", "backward", "grad_sync", "kfac_step", "optimizer_step", "factor_in_forward")


def new_regions() -> dict[str, float]:
    """Zeroed region sums."""
    return dict.fromkeys(REGIONS, 0.0)


def timed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pre: KFACPreconditioner | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    regions: dict[str, float],
    profiled: bool = False,
    sync: Callable[[nn.Module], object] | None = None,
) -> torch.Tensor:
    """Train one step (cross-entropy), adding each region's seconds to `regions`; return the loss.

    `profiled`: `pre` was built with ``profile=True``; then ``factor_in_forward`` (the factor computation its
    hooks did during the forward pass, from ``pre.phase_times()``) is added too. `sync` (e.g. a gradient
    allreduce) runs between backward and ``pre.step()``.
    """
    clock = time.perf_counter
    x, y = batch
    t0 = clock()
    optimizer.zero_grad()
    t1 = clock()
    before = pre.phase_times()["factor_computation"] if profiled and pre is not None else 0.0
    loss = F.cross_entropy(model(x), y)
    t2 = clock()
    if profiled and pre is not None:
        regions["factor_in_forward"] += pre.phase_times()["factor_computation"] - before
    loss.backward()
    t3 = clock()
    if sync is not None:
        sync(model)
    t4 = clock()
    if pre is not None:
        pre.step()
    t5 = clock()
    optimizer.step()
    t6 = clock()
    for name, seconds in zip(REGIONS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=False):
        regions[name] += seconds
    return loss
