"""What a distributed K-FAC run will cost, for any model at any world size, without starting a process.

:func:`plan_model` registers the model's layers exactly as the preconditioner does
(:func:`kfac_dist.registry.register_layers`; a model given by name is built on the meta device, so nothing is
allocated), runs :func:`kfac_dist.placement.build_plan` and the closed forms of :mod:`kfac_dist.costs` unchanged,
and returns a :class:`PlanReport`: per-rank memory by category, per-rank bytes by category for each kind of step
and amortised over the schedule, the decomposition load, and the same placement under KAISA's scheme
(``factor_comm="allreduce"``) beside it. The numbers equal what a real run's ``comm_stats()`` and
``memory_usage()`` record (tests/test_planner.py checks this on gloo processes).

Step ``k`` reduces factors when ``k % factor_update_steps == 0`` and decomposes when ``k % inv_update_steps == 0``.
The kinds of step (:data:`STEP_KINDS`): ``"factor"`` (factors only), ``"inverse"`` (factors and decompositions,
as step 0), ``"inverse_only"`` (decompositions without a factor step; only when the inverse period is not a multiple
of the factor period) and ``"plain"`` (preconditioning only). A rank's traffic is its sent plus received bytes
(per fusion bucket, in the bandwidth-optimal model of :mod:`kfac_dist.comm.accounting`; see :mod:`kfac_dist.costs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from kfac_dist import costs
from kfac_dist.costs import ElementBytes
from kfac_dist.options import KFACOptions, check_patterns
from kfac_dist.placement import LayerShape, Plan, build_plan
from kfac_dist.registry import register_layers, unwrap

#: ``kind: (factor step, inverse step)`` of every kind of step the report counts.
STEP_KINDS: dict[str, tuple[bool, bool]] = {
    "factor": (True, False),
    "inverse": (True, True),
    "inverse_only": (False, True),
    "plain": (False, False),
}

PerRankTraffic = dict[int, dict[str, dict[str, float]]]


def steps_per_period(options: KFACOptions) -> tuple[int, dict[str, int]]:
    """The period of the schedule and how many steps of each kind of :data:`STEP_KINDS` it holds.

    The period is ``lcm(factor_update_steps, inv_update_steps)`` (callable frequencies: their values at step 0).
    """
    factor_steps, inv_steps = int(options.value("factor_update_steps", 0)), int(options.value("inv_update_steps", 0))
    period = math.lcm(factor_steps, inv_steps)
    factor, inverse = period // factor_steps, period // inv_steps
    return period, {
        "factor": factor - 1,
        "inverse": 1,
        "inverse_only": inverse - 1,
        "plain": period - factor - inverse + 1,
    }


@dataclass(frozen=True)
class PlanReport:
    """Everything ``kfac-dist plan`` prints; all byte counts are per rank, indexed by rank.

    Args:
        model: the model's name (or class name).
        options: the options planned for (callables replaced by their values at step 0).
        sizes: the bytes per element planned for.
        plan: the placement, equal to the one the preconditioner builds.
        layers: the preconditioned layers' shapes, in registration order.
        memory: ``{rank: {category: bytes}}`` (:func:`kfac_dist.costs.memory_bytes`).
        step_bytes: ``{kind: {rank: {category: {"sent": bytes, "received": bytes}}}}`` for each kind of step.
        amortised: the same, averaged per step over the schedule.
        load: the decomposition load of each rank.
        kaisa_memory: ``memory`` under ``factor_comm="allreduce"`` (same placement).
        kaisa_amortised: ``amortised`` under ``factor_comm="allreduce"``.
    """

    model: str
    options: KFACOptions
    sizes: ElementBytes
    plan: Plan
    layers: tuple[LayerShape, ...]
    memory: dict[int, dict[str, int]]
    step_bytes: dict[str, costs.Traffic]
    amortised: PerRankTraffic
    load: costs.DecompositionLoad
    kaisa_memory: dict[int, dict[str, int]] = field(repr=False)
    kaisa_amortised: PerRankTraffic = field(repr=False)

    @property
    def world_size(self) -> int:
        """Number of ranks W."""
        return self.plan.world_size

    def summary(self) -> dict[str, float]:
        """Max and mean over ranks of memory and amortised traffic (bytes), ours and KAISA's, and the load."""
        out: dict[str, float] = {}
        for prefix, memory, amortised in (
            ("", self.memory, self.amortised),
            ("kaisa_", self.kaisa_memory, self.kaisa_amortised),
        ):
            mem, traffic = [sum(m.values()) for m in memory.values()], [traffic_total(t) for t in amortised.values()]
            out |= {f"{prefix}memory_max": max(mem), f"{prefix}memory_mean": sum(mem) / len(mem)}
            out |= {f"{prefix}amortised_max": max(traffic), f"{prefix}amortised_mean": sum(traffic) / len(traffic)}
        return out | {"load_max": self.load.max, "load_mean": self.load.mean, "load_imbalance": self.load.imbalance}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the whole report (per-rank lists are indexed by rank)."""
        ranks = range(self.world_size)
        return {
            "model": self.model,
            "world_size": self.world_size,
            "options": self.options.to_dict()
            | {"skip_layers": list(self.options.skip_layers)}
            | {f"{kind}_bytes": size for kind, size in asdict(self.sizes).items()},
            "period": steps_per_period(self.options)[0],
            "steps_per_period": steps_per_period(self.options)[1],
            "layers": [asdict(shape) for shape in self.layers],
            "plan": self.plan.to_dict(),
            "memory": [self.memory[r] for r in ranks],
            "bytes": {kind: [traffic[r] for r in ranks] for kind, traffic in self.step_bytes.items()}
            | {"amortised": [self.amortised[r] for r in ranks]},
            "decomposition_load": {"per_rank": list(self.load.per_rank), "max": self.load.max, "mean": self.load.mean},
            "kaisa": {
                "memory": [self.kaisa_memory[r] for r in ranks],
                "amortised": [self.kaisa_amortised[r] for r in ranks],
            },
            "summary": self.summary(),
        }


def layer_shapes(model: nn.Module, skip_layers: Iterable[str] | str = ()) -> tuple[LayerShape, ...]:
    """The shapes of the layers the preconditioner would register for `model`, in its order."""
    states, _ = register_layers(unwrap(model), check_patterns("skip_layers", skip_layers))
    return tuple(state.shape() for state in states.values())


def plan_model(
    model: nn.Module,
    world_size: int,
    options: KFACOptions | None = None,
    *,
    sizes: ElementBytes | None = None,
    name: str | None = None,
) -> PlanReport:
    """Plan a model at a world size: placement, memory, bytes per step and decomposition load.

    Args:
        model: the model (on any device; the meta device allocates nothing).
        world_size: number of ranks W >= 1.
        options: K-FAC's options (default: every default); callables are planned at their values at step 0.
        sizes: bytes per element (default: :meth:`ElementBytes.of` the options, for float32 gradients).
        name: the model's name in the report (default: the model's class name).

    Returns:
        The report.

    Raises:
        ValueError: naming the argument, for any bad value (and if the model has no layer to precondition).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    o = (options or KFACOptions()).at_step(0)
    sizes = sizes or ElementBytes.of(o)
    shapes = layer_shapes(model, o.skip_layers)
    plan = build_plan(shapes, world_size, o.grad_worker_fraction, o.assignment)
    kaisa = replace(o, factor_comm="allreduce")
    return PlanReport(
        model=name or type(unwrap(model)).__name__,
        options=o,
        sizes=sizes,
        plan=plan,
        layers=shapes,
        memory=costs.memory_bytes(plan, shapes, o, sizes=sizes),
        step_bytes={
            kind: costs.step_bytes(plan, shapes, o, factor_step=f, inverse_step=i, sizes=sizes)
            for kind, (f, i) in STEP_KINDS.items()
        },
        amortised=costs.amortised_bytes(plan, shapes, o, sizes=sizes),
        load=costs.decomposition_load(plan, shapes),
        kaisa_memory=costs.memory_bytes(plan, shapes, kaisa, sizes=sizes),
        kaisa_amortised=costs.amortised_bytes(plan, shapes, kaisa, sizes=sizes),
    )


def traffic_total(per_category: Mapping[str, Mapping[str, float]]) -> float:
    """Sent plus received bytes over every category."""
    return float(sum(v["sent"] + v["received"] for v in per_category.values()))
