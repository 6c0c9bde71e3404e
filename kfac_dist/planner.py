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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kfac_dist import costs
from kfac_dist.models import MODEL_NAMES, build_model
from kfac_dist.options import COMPUTE_METHODS, FACTOR_COMMS, check_choice, check_flag, check_patterns
from kfac_dist.placement import ASSIGNMENTS, LayerShape, Plan, build_plan, resolve_grad_worker_fraction
from kfac_dist.registry import register_layers, unwrap

#: ``kind: (factor step, inverse step)`` of every kind of step the report counts.
STEP_KINDS: dict[str, tuple[bool, bool]] = {
    "factor": (True, False),
    "inverse": (True, True),
    "inverse_only": (False, True),
    "plain": (False, False),
}
_LABELS = {kind: kind.replace("_", "-") + " step" for kind in STEP_KINDS}
#: Per-rank rows are printed up to this world size (beyond it, only min/mean/max/total) unless asked for.
MAX_RANK_ROWS = 16

PerRankTraffic = dict[int, dict[str, dict[str, float]]]


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """The preconditioner options the plan depends on (same names, meanings and defaults).

    Args:
        grad_worker_fraction: a float in (0, 1] or ``"mem-opt"``, ``"hybrid-opt"``, ``"comm-opt"``.
        assignment: ``"compute"`` or ``"memory"``.
        factor_comm: ``"owner"`` or ``"allreduce"`` (KAISA).
        symmetric_comm: send symmetric matrices as upper triangles.
        compute_method: ``"eigen"`` or ``"inverse"``.
        bucket_cap_mb: fusion bucket cap in MiB (> 0).
        factor_update_steps: steps between factor updates (>= 1).
        inv_update_steps: steps between decompositions (>= 1).
        skip_layers: glob patterns of modules (names or class names) not to precondition.
        factor_bytes: bytes per factor element (4 for float32).
        inv_bytes: bytes per decomposition element.
        grad_bytes: bytes per gradient element.
    """

    grad_worker_fraction: float | str = "comm-opt"
    assignment: str = "compute"
    factor_comm: str = "owner"
    symmetric_comm: bool = True
    compute_method: str = "eigen"
    bucket_cap_mb: float = costs.DEFAULT_BUCKET_CAP_MB
    factor_update_steps: int = 1
    inv_update_steps: int = 1
    skip_layers: tuple[str, ...] = ()
    factor_bytes: int = 4
    inv_bytes: int = 4
    grad_bytes: int = 4

    def __post_init__(self) -> None:
        """Reject a bad value with a ValueError naming the option."""
        resolve_grad_worker_fraction(self.grad_worker_fraction, 1)
        check_choice("assignment", self.assignment, ASSIGNMENTS)
        check_choice("factor_comm", self.factor_comm, FACTOR_COMMS)
        check_choice("compute_method", self.compute_method, COMPUTE_METHODS)
        check_flag("symmetric_comm", self.symmetric_comm)
        value = self.bucket_cap_mb
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0; got {value!r}")
        object.__setattr__(self, "skip_layers", check_patterns("skip_layers", self.skip_layers))
        for key in ("factor_update_steps", "inv_update_steps", "factor_bytes", "inv_bytes", "grad_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1; got {value!r}")

    @property
    def period(self) -> int:
        """Steps after which the schedule repeats: ``lcm(factor_update_steps, inv_update_steps)``."""
        return math.lcm(self.factor_update_steps, self.inv_update_steps)

    def steps_per_period(self) -> dict[str, int]:
        """How many steps of each kind of :data:`STEP_KINDS` one period holds."""
        p, factor, inverse = self.period, self.period // self.factor_update_steps, self.period // self.inv_update_steps
        return {"factor": factor - 1, "inverse": 1, "inverse_only": inverse - 1, "plain": p - factor - inverse + 1}


@dataclass(frozen=True)
class PlanReport:
    """Everything ``kfac-dist plan`` prints; all byte counts are per rank, indexed by rank.

    Args:
        model: the model's name (or class name).
        options: the options planned for.
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
    options: PlanOptions
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
            mem, traffic = [sum(m.values()) for m in memory.values()], [_traffic(t) for t in amortised.values()]
            out |= {f"{prefix}memory_max": max(mem), f"{prefix}memory_mean": sum(mem) / len(mem)}
            out |= {f"{prefix}amortised_max": max(traffic), f"{prefix}amortised_mean": sum(traffic) / len(traffic)}
        return out | {"load_max": self.load.max, "load_mean": self.load.mean, "load_imbalance": self.load.imbalance}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the whole report (per-rank lists are indexed by rank)."""
        ranks = range(self.world_size)
        return {
            "model": self.model,
            "world_size": self.world_size,
            "options": asdict(self.options) | {"skip_layers": list(self.options.skip_layers)},
            "period": self.options.period,
            "steps_per_period": self.options.steps_per_period(),
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

    def to_text(self, per_rank: bool | None = None) -> str:
        """A readable report in MiB; per-rank rows up to :data:`MAX_RANK_ROWS` ranks unless `per_rank` says."""
        o, counts, s = self.options, self.options.steps_per_period(), self.summary()
        kinds = [k for k in STEP_KINDS if counts[k]]
        schedule = ", ".join(f"{counts[k]} {_LABELS[k]}{'s' * (counts[k] != 1)}" for k in kinds)
        lines = [
            f"kfac-dist plan: {self.model}, {len(self.layers)} preconditioned layers "
            f"({sum(x.grad_numel for x in self.layers):,} parameters), world size {self.world_size}",
            f"  grad_worker_fraction={self.plan.grad_worker_fraction:.4g} ({self.plan.grad_workers} grad workers per "
            f"layer), assignment={o.assignment}, factor_comm={o.factor_comm}, symmetric_comm={o.symmetric_comm}",
            f"  compute_method={o.compute_method}; bytes per element: factor {o.factor_bytes}, inverse {o.inv_bytes}, "
            f"gradient {o.grad_bytes}; bucket_cap_mb={o.bucket_cap_mb:g}",
            f"  factors every {o.factor_update_steps} steps, decompositions every {o.inv_update_steps} "
            "(an inverse step also updates factors, as step 0)",
            f"  per {o.period} steps: {schedule}; {len(self.plan.groups())} process groups; "
            f"plan fingerprint {self.plan.fingerprint()}",
            "",
            "Per rank: layers owned, memory (MiB), traffic per step (MiB sent + received), decomposition load / mean",
            *self._rank_table(kinds, per_rank),
            "",
            "Traffic per rank per step by category (MiB)",
            *self._category_table(kinds),
            "",
            f"Decomposition load (sum of a^3 + g^3 of owned layers): max {self.load.max:.4g}, "
            f"mean {self.load.mean:.4g}, max/mean {self.load.imbalance:.3f}",
            "",
            "Beside KAISA (factor_comm=allreduce, same placement), per rank:",
        ]
        pairs = [("max memory (MiB)", "memory_max"), ("mean memory (MiB)", "memory_mean")]
        pairs += [("max amortised traffic (MiB/step)", "amortised_max")]
        pairs += [("mean amortised traffic (MiB/step)", "amortised_mean")]
        lines += _table(["", "this plan", "KAISA"], [[k, _mib(s[v]), _mib(s["kaisa_" + v])] for k, v in pairs])
        return "\n".join(line.rstrip() for line in lines)

    def _rank_table(self, kinds: list[str], per_rank: bool | None) -> list[str]:
        head = ["rank", "layers", *costs.MEMORY_CATEGORIES, "memory", *(_LABELS[k] for k in kinds), "amortised"]
        rows = []
        for r in range(self.world_size):
            memory = [float(self.memory[r][c]) for c in costs.MEMORY_CATEGORIES]
            traffic = [_traffic(self.step_bytes[k][r]) for k in kinds] + [_traffic(self.amortised[r])]
            load = self.load.per_rank[r] / self.load.mean if self.load.mean else 1.0
            rows.append([len(self.plan.layers_owned_by(r)), *memory, sum(memory), *traffic, load])
        show = per_rank if per_rank is not None else self.world_size <= MAX_RANK_ROWS
        shown = rows if show else []
        names = [str(r) for r in range(len(shown))] + ["min", "mean", "max", "total"]
        body = shown + [[f(col) for col in zip(*rows, strict=True)] for f in (min, _mean, max, sum)]
        formats = [lambda v: f"{v:,.4g}"] + [_mib] * (len(head) - 2) + [lambda v: f"{v:.3f}"]
        return _table(
            [*head, "load"],
            [[n] + [f(v) for f, v in zip(formats, row, strict=True)] for n, row in zip(names, body, strict=True)],
        )

    def _category_table(self, kinds: list[str]) -> list[str]:
        body = []
        for kind in [*kinds, "amortised"]:
            per_rank: Mapping[int, Mapping[str, Mapping[str, float]]]
            per_rank = self.amortised if kind == "amortised" else self.step_bytes[kind]
            for category in (*costs.CATEGORIES, "all"):
                cats = costs.CATEGORIES if category == "all" else (category,)
                cols = [[sum(t[c][d] for c in cats) for t in per_rank.values()] for d in ("sent", "received")]
                body.append([_LABELS.get(kind, kind), category, *(_mib(f(c)) for c in cols for f in (_mean, max))])
        return _table(["step", "category", "sent mean", "sent max", "received mean", "received max"], body)


def _traffic(per_category: Mapping[str, Mapping[str, float]]) -> float:
    """Sent plus received bytes over every category."""
    return float(sum(v["sent"] + v["received"] for v in per_category.values()))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mib(value: float) -> str:
    return f"{value / 2**20:,.2f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (the first one left-aligned)."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in enumerate(zip(row, widths, strict=True)))
        for row in [head, *rows]
    ]


def layer_shapes(model: nn.Module, skip_layers: Iterable[str] | str = ()) -> tuple[LayerShape, ...]:
    """The shapes of the layers the preconditioner would register for `model`, in its order."""
    states, _ = register_layers(unwrap(model), check_patterns("skip_layers", skip_layers))
    return tuple(state.shape() for state in states.values())


#: ``KFACPreconditioner`` arguments the plan takes as they are (same name and meaning in :class:`PlanOptions`).
SHARED_OPTIONS = (
    "grad_worker_fraction",
    "assignment",
    "factor_comm",
    "symmetric_comm",
    "compute_method",
    "bucket_cap_mb",
    "factor_update_steps",
    "inv_update_steps",
    "skip_layers",
)


def plan_arguments(preconditioner_options: Mapping[str, Any], step: int = 0) -> dict[str, Any]:
    """:func:`plan_model` keyword arguments for ``KFACPreconditioner`` keyword arguments.

    The options of :data:`SHARED_OPTIONS` are taken as they are (a callable of the K-FAC step: its value at
    `step`); ``factor_dtype`` and ``inv_dtype`` give ``factor_bytes`` and ``inv_bytes`` (``factor_dtype=None``
    leaves the default, float32 weights' 4 bytes). Every other option (damping, factor_decay, kl_clip, lr,
    accumulation_steps, ...) changes no byte and is ignored.
    """
    out: dict[str, Any] = {}
    for key in SHARED_OPTIONS:
        if key in preconditioner_options:
            value = preconditioner_options[key]
            out[key] = value(step) if callable(value) else value
    for key in ("factor", "inv"):
        dtype = preconditioner_options.get(f"{key}_dtype")
        if dtype is not None:
            out[f"{key}_bytes"] = dtype.itemsize
    return out


def plan_model(
    model: nn.Module | str,
    world_size: int,
    *,
    grad_worker_fraction: float | str = "comm-opt",
    assignment: str = "compute",
    factor_comm: str = "owner",
    symmetric_comm: bool = True,
    compute_method: str = "eigen",
    bucket_cap_mb: float = costs.DEFAULT_BUCKET_CAP_MB,
    factor_update_steps: int = 1,
    inv_update_steps: int = 1,
    skip_layers: Iterable[str] | str = (),
    factor_bytes: int = 4,
    inv_bytes: int = 4,
    grad_bytes: int = 4,
    name: str | None = None,
) -> PlanReport:
    """Plan a model at a world size: placement, memory, bytes per step and decomposition load.

    Args:
        model: a model (on any device; the meta device allocates nothing), or a name of
            :data:`kfac_dist.models.MODEL_NAMES` (built on the meta device).
        world_size: number of ranks W >= 1.
        grad_worker_fraction: as :class:`PlanOptions` (and the preconditioner).
        assignment: as :class:`PlanOptions`.
        factor_comm: as :class:`PlanOptions`.
        symmetric_comm: as :class:`PlanOptions`.
        compute_method: as :class:`PlanOptions`.
        bucket_cap_mb: as :class:`PlanOptions`.
        factor_update_steps: as :class:`PlanOptions`.
        inv_update_steps: as :class:`PlanOptions`.
        skip_layers: as :class:`PlanOptions`.
        factor_bytes: as :class:`PlanOptions`.
        inv_bytes: as :class:`PlanOptions`.
        grad_bytes: as :class:`PlanOptions`.
        name: the model's name in the report (default: the registry name, or the model's class name).

    Returns:
        The report.

    Raises:
        ValueError: naming the option, for any bad value (and if the model has no layer to precondition).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
    options = PlanOptions(
        grad_worker_fraction=grad_worker_fraction,
        assignment=assignment,
        factor_comm=factor_comm,
        symmetric_comm=symmetric_comm,
        compute_method=compute_method,
        bucket_cap_mb=bucket_cap_mb,
        factor_update_steps=factor_update_steps,
        inv_update_steps=inv_update_steps,
        skip_layers=tuple(check_patterns("skip_layers", skip_layers)),
        factor_bytes=factor_bytes,
        inv_bytes=inv_bytes,
        grad_bytes=grad_bytes,
    )
    if isinstance(model, str):
        if model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}; got {model!r}")
        name = name or model
        with torch.device("meta"):
            model = build_model(model)
    elif isinstance(model, nn.Module):
        name = name or type(unwrap(model)).__name__
    else:
        raise ValueError(f"model must be an nn.Module or a model name; got {type(model).__name__}")
    shapes = layer_shapes(model, options.skip_layers)
    plan = build_plan(shapes, world_size, options.grad_worker_fraction, options.assignment)
    o = options
    sizes: dict[str, Any] = {
        "compute_method": o.compute_method,
        "symmetric_comm": o.symmetric_comm,
        "bucket_cap_mb": o.bucket_cap_mb,
        "factor_bytes": o.factor_bytes,
        "inv_bytes": o.inv_bytes,
    }
    wire = sizes | {"grad_bytes": o.grad_bytes}
    periods: dict[str, Any] = {"factor_update_steps": o.factor_update_steps, "inv_update_steps": o.inv_update_steps}
    return PlanReport(
        model=name,
        options=options,
        plan=plan,
        layers=shapes,
        memory=costs.memory_bytes(plan, shapes, factor_comm=o.factor_comm, **sizes),
        step_bytes={
            kind: costs.step_bytes(plan, shapes, factor_step=f, inverse_step=i, factor_comm=o.factor_comm, **wire)
            for kind, (f, i) in STEP_KINDS.items()
        },
        amortised=costs.amortised_bytes(plan, shapes, factor_comm=o.factor_comm, **periods, **wire),
        load=costs.decomposition_load(plan, shapes),
        kaisa_memory=costs.memory_bytes(plan, shapes, factor_comm="allreduce", **sizes),
        kaisa_amortised=costs.amortised_bytes(plan, shapes, factor_comm="allreduce", **periods, **wire),
    )
