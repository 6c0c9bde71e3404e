"""Models, phases and the phase breakdown of the overhead benchmark (:mod:`kfac_dist.app.bench.overhead`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from kfac_dist.app.bench.arms import Block
from kfac_dist.app.bench.common import PROXY, ModelSpec

__all__ = ["MODELS", "PHASES", "TOLERANCE", "Workload", "block_steps", "breakdown", "coarse", "median_dict"]

#: Phases of the breakdown, in stacking order.
PHASES = (
    "forward",
    "backward",
    "factor_computation",
    "factor_communication",
    "decomposition",
    "preconditioning",
    "gradient_broadcast",
    "other",
)
#: Library phase (kfac_dist.timing.PHASES) -> breakdown phase.
LIBRARY_PHASE_MAP = {
    "factor_computation": "factor_computation",
    "factor_update": "factor_computation",
    "factor_communication": "factor_communication",
    "decomposition": "decomposition",
    "decomposition_broadcast": "decomposition",
    "preconditioning": "preconditioning",
    "kl_clip": "preconditioning",
    "gradient_broadcast": "gradient_broadcast",
}
#: The named phases must add up to the measured step within this fraction.
TOLERANCE = 0.10


@dataclass(frozen=True)
class Workload:
    """A model of the benchmark on batches of ``batch``."""

    title: str
    model: ModelSpec
    batch: int

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        m = self.model
        kwargs = {k: v for k, v in m.kwargs.items() if k != "num_classes"}
        return {"title": self.title, "builder": m.builder, "input_shape": list(m.input_shape), "batch": self.batch,
                "num_classes": m.num_classes, "kwargs": kwargs}  # fmt: skip


MODELS: dict[str, Workload] = {
    "resnet50_proxy": Workload("ResNet-50 proxy (width 1/8, 32x32, batch 196, 125 classes)", PROXY, 196),
    "small_cnn": Workload("small CNN (28x28, batch 64)", ModelSpec("small_cnn", {"num_classes": 10}, (1, 28, 28)), 64),
    "mlp": Workload("MLP 784-128-64-10 (batch 64)", ModelSpec("mlp", {"num_classes": 10}, (1, 28, 28)), 64),
}


def _optimizer(times: Block) -> float:
    return times.regions["zero_grad"] + times.regions["optimizer_step"]


def breakdown(times: Block) -> dict[str, Any]:
    """Phases in ms per step of a profiled K-FAC block, their sum against the measured step, and the check."""
    lib, regions = times.library, times.regions
    in_forward = regions["factor_in_forward"]
    in_backward = lib["factor_computation"] - in_forward
    phases = dict.fromkeys(PHASES, 0.0)
    phases["forward"] = regions["forward"] - in_forward
    phases["backward"] = regions["backward"] - in_backward
    for name, seconds in lib.items():
        phases[LIBRARY_PHASE_MAP[name]] += seconds
    phases["other"] = _optimizer(times)
    named = sum(phases.values())
    remainder = times.wall - named
    phases["other"] += remainder
    ms = {name: times.per_step_ms(seconds) for name, seconds in phases.items()}
    return {
        "step_ms": times.per_step_ms(times.wall),
        "cpu_ms": times.per_step_ms(times.cpu),
        "phases_ms": ms,
        "named_sum_ms": times.per_step_ms(named),
        "remainder_ms": times.per_step_ms(remainder),
        "optimizer_ms": times.per_step_ms(_optimizer(times)),
        "untimed_in_kfac_step_ms": times.per_step_ms(
            regions["kfac_step"] - sum(lib.values()) + lib["factor_computation"]
        ),
        "coverage": named / times.wall,
        "within_tolerance": abs(remainder) <= TOLERANCE * times.wall,
        "library_phases_ms": {name: times.per_step_ms(seconds) for name, seconds in lib.items()},
    }


def coarse(times: Block) -> dict[str, float]:
    """The timed regions of a block in ms per step (forward includes the hooks' factor work)."""
    regions = {name: times.regions[name] for name in ("forward", "backward", "kfac_step")}
    return {name: times.per_step_ms(s) for name, s in (regions | {"optimizer": _optimizer(times)}).items()}


def median_dict(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise medians of dicts with the same keys."""
    return {key: statistics.median(d[key] for d in dicts) for key in dicts[0]}


def block_steps(freq: tuple[int, int], minimum: int) -> int:
    """Whole inverse periods, at least ``minimum`` steps."""
    return freq[1] * max(1, -(-minimum // freq[1]))
