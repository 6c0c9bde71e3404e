"""Arms, timed blocks and the phase breakdown of the overhead benchmark (:mod:`kfac_dist.app.bench.overhead`)."""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench.timed_step import new_regions, timed_step
from kfac_dist.models import build_model

__all__ = [
    "LIBRARY_PHASE_MAP",
    "MODELS",
    "PHASES",
    "TOLERANCE",
    "Arm",
    "BlockTimes",
    "ModelSpec",
    "block_steps",
    "breakdown",
    "coarse",
    "median_dict",
]

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
class ModelSpec:
    """A model of the benchmark: ``build_model(builder, **kwargs)`` on batches of ``batch`` x ``input_shape``."""

    title: str
    builder: str
    input_shape: tuple[int, ...]
    batch: int
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model (weights from the current torch seed)."""
        return build_model(self.builder, num_classes=self.num_classes, **self.kwargs)


MODELS: dict[str, ModelSpec] = {
    "resnet50_proxy": ModelSpec(
        "ResNet-50 proxy (width 1/8, 32x32, batch 196, 125 classes)",
        "resnet50",
        (3, 32, 32),
        196,
        125,
        {"width_multiplier": 0.125},
    ),
    "small_cnn": ModelSpec("small CNN (28x28, batch 64)", "small_cnn", (1, 28, 28), 64, 10),
    "mlp": ModelSpec("MLP 784-128-64-10 (batch 64)", "mlp", (1, 28, 28), 64, 10),
}


@dataclass
class BlockTimes:
    """Seconds of one block: its wall time and the sums of the timed regions over its steps."""

    steps: int
    wall: float
    cpu: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    kfac_step: float = 0.0
    optimizer: float = 0.0
    factor_in_forward: float = 0.0
    library: dict[str, float] = field(default_factory=dict)

    @property
    def busy(self) -> float:
        """Process CPU time over wall time: below 1 when the (one-thread) process waited for a core."""
        return self.cpu / self.wall if self.wall > 0 else 1.0

    def per_step_ms(self, seconds: float) -> float:
        """``seconds`` of this block as milliseconds per step."""
        return 1000.0 * seconds / self.steps


class Arm:
    """One optimizer on its own copy of the model: SGD-momentum, optionally preconditioned by K-FAC."""

    def __init__(self, name: str, model: nn.Module, lr: float, method: str | None, freq: tuple[int, int]) -> None:
        self.name, self.model, self.method, self.freq, self.lr = name, model, method, freq, lr
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.profiled = False
        self.pre: KFACPreconditioner | None = self._preconditioner(profile=False) if method else None
        self.position = 0  # index of the next batch
        self.last_loss = math.nan

    def _preconditioner(self, profile: bool) -> KFACPreconditioner:
        assert self.method is not None
        return KFACPreconditioner(
            self.model,
            lr=self.lr,
            factor_update_steps=self.freq[0],
            inv_update_steps=self.freq[1],
            compute_method=self.method,
            profile=profile,
        )

    def rebuild(self, profile: bool, align: bool = True) -> None:
        """Replace the preconditioner by one with ``profile``, same state, step counter on an inverse step."""
        if self.pre is None:
            return
        state = self.pre.state_dict()
        if align:
            period = self.freq[1]
            state["steps"] = -(-int(state["steps"]) // period) * period
        self.pre.remove_hooks()
        self.pre = self._preconditioner(profile)
        self.profiled = profile
        self.pre.load_state_dict(state)

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> BlockTimes:
        """Train ``steps`` steps and time them (phase reads only when the preconditioner profiles)."""
        pre, optimizer, model = self.pre, self.optimizer, self.model
        profiled = self.profiled
        if pre is not None:
            pre.reset_phase_times()
        regions = new_regions()
        clock = time.perf_counter
        gc.collect()
        cpu_start = time.process_time()
        start = clock()
        for _ in range(steps):
            batch = batches[self.position % len(batches)]
            self.position += 1
            loss = timed_step(model, optimizer, pre, batch, regions, profiled)
        wall, cpu = clock() - start, time.process_time() - cpu_start
        times = BlockTimes(
            steps=steps,
            wall=wall,
            cpu=cpu,
            forward=regions["forward"],
            backward=regions["backward"],
            kfac_step=regions["kfac_step"],
            optimizer=regions["zero_grad"] + regions["optimizer_step"],
            factor_in_forward=regions["factor_in_forward"],
        )
        self.last_loss = float(loss.detach())
        if pre is not None and profiled:
            times.library = pre.phase_times()
        return times


def breakdown(times: BlockTimes) -> dict[str, Any]:
    """Phases in ms per step of a profiled K-FAC block, their sum against the measured step, and the check."""
    lib = times.library
    in_forward = times.factor_in_forward
    in_backward = lib["factor_computation"] - in_forward
    phases = dict.fromkeys(PHASES, 0.0)
    phases["forward"] = times.forward - in_forward
    phases["backward"] = times.backward - in_backward
    for name, seconds in lib.items():
        phases[LIBRARY_PHASE_MAP[name]] += seconds
    phases["other"] = times.optimizer
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
        "optimizer_ms": times.per_step_ms(times.optimizer),
        "untimed_in_kfac_step_ms": times.per_step_ms(times.kfac_step - sum(lib.values()) + lib["factor_computation"]),
        "coverage": named / times.wall,
        "within_tolerance": abs(remainder) <= TOLERANCE * times.wall,
        "library_phases_ms": {name: times.per_step_ms(seconds) for name, seconds in lib.items()},
    }


def coarse(times: BlockTimes) -> dict[str, float]:
    """The timed regions of a block in ms per step (forward includes the hooks' factor work)."""
    return {name: times.per_step_ms(getattr(times, name)) for name in ("forward", "backward", "kfac_step", "optimizer")}


def median_dict(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise medians of dicts with the same keys."""
    return {key: statistics.median(d[key] for d in dicts) for key in dicts[0]}


def block_steps(freq: tuple[int, int], minimum: int) -> int:
    """Whole inverse periods, at least ``minimum`` steps."""
    return freq[1] * max(1, -(-minimum // freq[1]))
