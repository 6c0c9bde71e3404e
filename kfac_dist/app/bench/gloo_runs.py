"""What the benchmarks run on real gloo processes: the proxy model, the gradient averaging, the time limits.

The processes themselves come from :func:`kfac_dist.app.processes.run_gloo`, called with :data:`BENCH_LIMITS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist.models import build_model

__all__ = ["BENCH_LIMITS", "BenchLimits", "ProxySpec", "average_gradients"]


class BenchLimits(TypedDict):
    """Keyword arguments of :func:`kfac_dist.app.processes.run_gloo` that bound a launch."""

    timeout: float
    pg_timeout: float


#: Time limits of a benchmark launch: the whole run, and each collective (W = 4 on 2 cores is slow).
BENCH_LIMITS: BenchLimits = {"timeout": 900.0, "pg_timeout": 120.0}


@dataclass(frozen=True)
class ProxySpec:
    """A model the benchmarks run on real processes: ``build_model(builder, **kwargs)`` on ``input_shape`` inputs.

    The default is ResNet-50's 54 preconditioned layers at 1/8 width (125 classes) on 32x32 inputs: the same
    layer structure as ResNet-50, small enough for several gloo processes on 2 cores.
    """

    builder: str = "resnet50"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width_multiplier": 0.125, "num_classes": 125})
    input_shape: tuple[int, ...] = (3, 32, 32)

    @property
    def num_classes(self) -> int:
        """Classes of the output layer."""
        return int(self.kwargs.get("num_classes", 1000))

    def build(self, seed: int = 0) -> nn.Module:
        """The model, weights from `seed`."""
        torch.manual_seed(seed)
        return build_model(self.builder, **self.kwargs)

    def build_meta(self) -> nn.Module:
        """The model on the meta device (shapes only, nothing allocated)."""
        with torch.device("meta"):
            return build_model(self.builder, **self.kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"builder": self.builder, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}


def average_gradients(model: nn.Module) -> int:
    """Average the gradients over the default group in one flat allreduce (as DDP does, without overlap).

    Returns:
        The bytes of the flat buffer (0 without a gradient or without an initialised group).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not dist.is_initialized():
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return flat.numel() * flat.element_size()
