"""The timed arm of the overhead and scaling benchmarks: one optimizer on its own copy of a model, trained in blocks.

An arm is SGD-momentum 0.9, optionally preconditioned by K-FAC. Every step of a block is timed region by region
(:data:`REGIONS`); a block also records its process CPU time (with one thread, CPU time < wall time means the
process waited for a core) and, when the preconditioner profiles, its phase times.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.options import KFACOptions

__all__ = ["REGIONS", "Arm", "Block"]

#: Timed regions of a step, in order, and the factor computation the hooks do inside the forward pass.
REGIONS = ("zero_grad", "forward", "backward", "grad_sync", "kfac_step", "optimizer_step", "factor_in_forward")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Block:
    """Seconds of one block: wall and CPU time, the sums of :data:`REGIONS` over its steps, the library's phases."""

    steps: int
    wall: float
    cpu: float
    regions: dict[str, float]
    library: dict[str, float] = field(default_factory=dict)

    @property
    def busy(self) -> float:
        """Process CPU time over wall time: below 1 when the (one-thread) process waited for a core."""
        return self.cpu / self.wall if self.wall > 0 else 1.0

    def per_step_ms(self, seconds: float) -> float:
        """``seconds`` of this block as milliseconds per step."""
        return 1000.0 * seconds / self.steps


class Arm:
    """SGD-momentum on `model`, preconditioned by K-FAC with `kfac` (None: plain SGD), cycling through `batches`.

    `sync` (e.g. a gradient allreduce) runs between backward and ``pre.step()``.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        batches: list[Batch],
        kfac: KFACOptions | None,
        lr: float = 0.01,
        sync: Callable[[nn.Module], object] | None = None,
    ) -> None:
        self.name, self.model, self.batches, self.kfac, self.lr, self.sync = name, model, batches, kfac, lr, sync
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.profiled = False
        self.pre = self._preconditioner(profile=False)
        self.position = 0  # index of the next batch
        self.last_loss = math.nan

    def _preconditioner(self, profile: bool) -> KFACPreconditioner | None:
        return None if self.kfac is None else KFACPreconditioner(self.model, self.kfac, lr=self.lr, profile=profile)

    def rebuild(self, profile: bool, align: bool = False) -> None:
        """The same K-FAC state in a preconditioner with ``profile`` (collective: every rank calls it).

        `align`: move the step counter to the next inverse step, so the next block starts on one.
        """
        if self.pre is None or self.kfac is None:
            return
        state = self.pre.state_dict()
        if align:
            period = int(self.kfac.value("inv_update_steps", 0))
            state["steps"] = -(-int(state["steps"]) // period) * period
        self.pre.remove_hooks()
        self.pre = self._preconditioner(profile)
        self.profiled = profile
        assert self.pre is not None
        self.pre.load_state_dict(state)

    def run(self, steps: int) -> Block:
        """Train ``steps`` steps (cross-entropy) and time them (phase reads only when the preconditioner profiles)."""
        pre, optimizer, model, profiled = self.pre, self.optimizer, self.model, self.profiled and self.pre is not None
        if pre is not None:
            pre.reset_phase_times()
        regions = dict.fromkeys(REGIONS, 0.0)
        clock = time.perf_counter
        gc.collect()
        cpu_start, start = time.process_time(), clock()
        for _ in range(steps):
            x, y = self.batches[self.position % len(self.batches)]
            self.position += 1
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
            if self.sync is not None:
                self.sync(model)
            t4 = clock()
            if pre is not None:
                pre.step()
            t5 = clock()
            optimizer.step()
            t6 = clock()
            for name, seconds in zip(REGIONS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=False):
                regions[name] += seconds
        block = Block(steps, clock() - start, time.process_time() - cpu_start, regions)
        if steps:
            self.last_loss = float(loss.detach())
        if pre is not None and profiled:
            block.library = pre.phase_times()
        return block
