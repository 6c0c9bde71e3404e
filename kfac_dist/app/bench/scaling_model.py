"""A latency-bandwidth (alpha-beta) model of one data-parallel training step, SGD and K-FAC, at any world size.

Pure functions (:mod:`kfac_dist.app.bench.scaling_runs` measures the inputs). Per process, :class:`Kernels` are lines
fitted to measured kernel times (GEMM per FLOP, memory-bound ops per byte, im2col, finite checks, ``eigh`` per n^3)
plus the model's measured compute per batch and what the library costs beyond its kernels. A collective over
g > 1 ranks takes ``alpha_op * ceil(log2 g) + beta_op * x`` (:class:`Network`), x the most bytes any member moves
under :func:`kfac_dist.comm.accounting.collective_bytes` (the planner's accounting); over one rank, a line in the
message's size. A K-FAC step is the SGD step (compute + gradient allreduce) plus the phases of
:mod:`kfac_dist.timing`: per layer the work of :func:`kfac_dist.work.layer_work` (eigen) priced by the kernels,
per fusion bucket the exchanges laid out as the library lays them out (:mod:`kfac_dist.entries`). A phase takes its
slowest rank, a step the sum of its phases (nothing overlaps), the amortised step the mean over one period.
Not modelled: step-to-step jitter between ranks, ranks sharing a host, numerical fallbacks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kfac_dist import timing
from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.comm.layout import Bucket, build_buckets
from kfac_dist.entries import decomposition_entries, factor_entries, gradient_entries
from kfac_dist.methods import EIGH_FLOPS_PER_N3, METHODS
from kfac_dist.options import KFACOptions
from kfac_dist.placement import LayerShape, Plan, build_plan
from kfac_dist.planner import STEP_KINDS, steps_per_period
from kfac_dist.work import LAYER_PHASES, Work, layer_work

__all__ = [
    "FRACTIONS",
    "KFAC_PHASES",
    "PHASES",
    "Kernels",
    "LinearFit",
    "Network",
    "StepLayer",
    "StepModel",
    "bucket_times",
    "fit_line",
    "predict_kfac",
    "predict_sgd",
]

#: K-FAC's phases: those :class:`kfac_dist.timing.PhaseTimer` measures.
KFAC_PHASES = timing.PHASES
#: Every phase of a modelled step: "compute" is forward + backward + optimizer.
PHASES = ("compute", "grad_allreduce", *KFAC_PHASES)
FLOAT_BYTES = 4
#: Grad-worker fractions of the predictions, by the library's names, at a world size.
FRACTIONS: dict[str, Callable[[int], float]] = {
    "comm-opt": lambda w: 1.0,
    "hybrid-opt": lambda w: 0.5,
    "mem-opt": lambda w: 1.0 / w,
}


@dataclass(frozen=True)
class LinearFit:
    """``y = intercept + slope * x``."""

    intercept: float
    slope: float

    def __call__(self, x: float) -> float:
        """The fitted value at `x`."""
        return self.intercept + self.slope * x


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least squares in *relative* error (weights ``1 / y^2``): timings spanning decades weigh alike.

    Raises:
        ValueError: with fewer than two distinct x or a non-positive y.
    """
    if len(xs) != len(ys) or len(set(xs)) < 2 or min(ys) <= 0:
        raise ValueError("fit_line needs >= 2 distinct x and positive y of the same length")
    w = [1.0 / y**2 for y in ys]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs, strict=True))
    sy = sum(wi * y for wi, y in zip(w, ys, strict=True))
    sxx = sum(wi * x * x for wi, x in zip(w, xs, strict=True))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys, strict=True))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    return LinearFit((sy - slope * sx) / sw, slope)


@dataclass(frozen=True)
class Kernels:
    """Per-process kernel costs in seconds (see the module docstring).

    Args:
        gemm: seconds vs FLOPs of one matrix product (intercept: per call; slope: 1 / rate).
        copy: seconds vs bytes read + written by one memory-bound tensor op (intercept: per call).
        im2col: seconds vs bytes written by one ``F.unfold`` (intercept: per call).
        finite: seconds vs bytes checked by one ``torch.isfinite(t).all()``.
        eigh: seconds vs n^3 of one symmetric eigendecomposition with eigenvectors (``EIGH_FLOPS_PER_N3`` FLOPs).
        compute: forward + backward + optimizer seconds per step at the per-rank batches measured (W = 1; at
            least two batches).
        layer_overhead: ``{phase: seconds}`` a layer costs in each phase of ``LAYER_PHASES`` beyond its
            counted kernels.
        tensor_overhead: seconds per parameter tensor of the gradient allreduce beyond its counted copy.
    """

    gemm: LinearFit
    copy: LinearFit
    im2col: LinearFit
    finite: LinearFit
    eigh: LinearFit
    compute: Mapping[int, float]
    layer_overhead: Mapping[str, float] = field(default_factory=dict)
    tensor_overhead: float = 0.0

    def compute_time(self, batch: int) -> float:
        """Forward + backward + optimizer at per-rank batch `batch`.

        The measurement where there is one, else linear between the two nearest measured batches (outside them,
        the line through the two at the nearer end, floored at 0).
        """
        if batch in self.compute:
            return float(self.compute[batch])
        sizes = sorted(self.compute)
        if len(sizes) < 2:
            raise ValueError(f"batch {batch} is not measured and fewer than two batches are: {sizes}")
        upper = min(max(bisect.bisect_left(sizes, batch), 1), len(sizes) - 1)
        x0, x1 = sizes[upper - 1], sizes[upper]
        y0, y1 = self.compute[x0], self.compute[x1]
        return max(0.0, y0 + (y1 - y0) * (batch - x0) / (x1 - x0))

    def seconds(self, work: Work) -> float:
        """Time of `work` (its decompositions priced as eigendecompositions)."""
        gemm = work.gemm_calls * self.gemm.intercept + work.gemm_flops * self.gemm.slope
        copy = work.copy_calls * self.copy.intercept + work.copy_bytes * self.copy.slope
        im2col = work.im2col_calls * self.im2col.intercept + work.im2col_bytes * self.im2col.slope
        finite = work.finite_calls * self.finite.intercept + work.finite_bytes * self.finite.slope
        eigh = (
            work.decompositions * self.eigh.intercept + work.decomposition_flops / EIGH_FLOPS_PER_N3 * self.eigh.slope
        )
        return gemm + copy + im2col + finite + eigh


@dataclass(frozen=True)
class Network:
    """Per collective op: seconds per ``ceil(log2 g)`` level (alpha) and per byte of the busiest member (beta).

    Args:
        name: a label.
        alpha: ``{op: seconds}`` for "allreduce", "reduce", "broadcast".
        beta: ``{op: seconds per byte}``.
        source: how the numbers were obtained (calibrated, or assumed from public numbers).
        local_alpha: ``{op: seconds}`` of a collective over one rank (missing ops: 0).
        local_beta: ``{op: seconds per byte of the message}`` of a collective over one rank (missing ops: 0).
    """

    name: str
    alpha: Mapping[str, float]
    beta: Mapping[str, float]
    source: str = ""
    local_alpha: Mapping[str, float] = field(default_factory=dict)
    local_beta: Mapping[str, float] = field(default_factory=dict)

    def time(self, op: str, group_size: int, max_bytes: float, nbytes: float) -> float:
        """Seconds of one collective of an `nbytes` message over `group_size` ranks.

        `max_bytes` is what the busiest member moves one way; over one rank, the local line in `nbytes` applies.
        """
        if group_size <= 1:
            return self.local_alpha.get(op, 0.0) + self.local_beta.get(op, 0.0) * nbytes
        return self.alpha[op] * math.ceil(math.log2(group_size)) + self.beta[op] * max_bytes


@dataclass(frozen=True)
class StepLayer:
    """A preconditioned layer as the step model sees it.

    Its shape, output locations per example, and whether its input rows go through ``F.unfold`` (a convolution
    with a kernel larger than 1x1).
    """

    shape: LayerShape
    locations: int
    unfold: bool

    def work(self, phase: str, batch: int) -> Work:
        """Its work in `phase` at per-rank batch `batch` (:func:`kfac_dist.work.layer_work`, eigen)."""
        return layer_work(self.shape, phase, method="eigen", rows=batch * self.locations, unfold=self.unfold)


@dataclass(frozen=True)
class StepModel:
    """A model as the step model sees it.

    Args:
        name: a label.
        layers: the preconditioned layers, in registration order.
        param_tensors: parameter tensors of the whole model (the gradient allreduce copies each).
        param_numel: parameters of the whole model (the gradient allreduce moves them all).
        freq: (factor, inverse) periods of K-FAC.
    """

    name: str
    layers: tuple[StepLayer, ...]
    param_tensors: int
    param_numel: int
    freq: tuple[int, int] = (10, 100)
    _plans: dict[tuple[int, float], Plan] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shapes(self) -> tuple[LayerShape, ...]:
        """The layers as placement sees them."""
        return tuple(layer.shape for layer in self.layers)

    def plan(self, world_size: int, fraction: float) -> Plan:
        """The library's placement at `world_size` and grad-worker fraction `fraction` (cached)."""
        key = (world_size, fraction)
        if key not in self._plans:
            self._plans[key] = build_plan(list(self.shapes), world_size, fraction, "compute")
        return self._plans[key]


def bucket_times(buckets: Sequence[Bucket], element_size: int, network: Network, kernels: Kernels) -> list[float]:
    """Seconds each rank spends in `buckets`: its collectives plus packing and unpacking every bucket it is in."""
    world = 1 + max((max(b.target.group) for b in buckets), default=0)
    out = [0.0] * world
    for bucket in buckets:
        target, nbytes = bucket.target, bucket.numel * element_size
        group = target.group
        moved = [collective_bytes(target.op.value, nbytes, group, r, target.root) for r in group]
        seconds = network.time(target.op.value, len(group), max(max(s, r) for s, r in moved), nbytes)
        local = kernels.seconds(Work(copy_calls=2.0 * len(bucket.slots) + 1, copy_bytes=3.0 * nbytes))  # pack, unpack
        for rank in group:
            out[rank] += seconds + local
    return out


def _grad_allreduce(model: StepModel, world_size: int, network: Network, kernels: Kernels) -> float:
    """Flatten the gradients, allreduce them (one flat buffer), copy them back."""
    nbytes = model.param_numel * FLOAT_BYTES
    moved = collective_bytes("allreduce", nbytes, range(world_size), 0)
    local = kernels.seconds(Work(copy_calls=model.param_tensors + 2, copy_bytes=4.0 * nbytes))
    local += model.param_tensors * kernels.tensor_overhead
    return local + network.time("allreduce", world_size, max(moved), nbytes)


def predict_sgd(model: StepModel, world_size: int, batch: int, kernels: Kernels, network: Network) -> dict[str, float]:
    """Seconds per phase of an SGD step at per-rank batch `batch` ("step" is their sum)."""
    phases = {
        "compute": kernels.compute_time(batch),
        "grad_allreduce": _grad_allreduce(model, world_size, network, kernels),
    }
    return phases | {"step": sum(phases.values())}


def predict_kfac(
    model: StepModel, world_size: int, batch: int, kernels: Kernels, network: Network, fraction: float = 1.0
) -> dict[str, dict[str, float]]:
    """Seconds per phase of each kind of K-FAC step and amortised over one period of ``model.freq``.

    The library's default exchange: factors reduced into their owner, symmetric matrices sent as triangles.

    Returns:
        ``{kind: {phase: seconds, "step": total}}`` for the kinds of :data:`~kfac_dist.planner.STEP_KINDS`
        that occur, and ``"amortised"``.
    """
    plan = model.plan(world_size, fraction)
    base = predict_sgd(model, world_size, batch, kernels, network)
    ranks = range(world_size)
    per_rank: dict[str, list[float]] = {p: [0.0] * world_size for p in KFAC_PHASES}
    owned = {r: set(plan.layers_owned_by(r)) for r in ranks}
    worked = {r: set(plan.layers_worked_by(r)) for r in ranks}
    for layer in model.layers:
        name = layer.shape.name
        for phase in LAYER_PHASES:
            seconds = kernels.seconds(layer.work(phase, batch)) + kernels.layer_overhead.get(phase, 0.0)
            for r in ranks:
                own = name in owned[r]
                if {"decomposition": own, "factor_update": own, "preconditioning": name in worked[r]}.get(phase, True):
                    per_rank[phase][r] += seconds
    exchanges = (
        ("factor_communication", factor_entries(plan, model.shapes, "owner")),
        ("decomposition_broadcast", decomposition_entries(plan, model.shapes, METHODS["eigen"])),
        ("gradient_broadcast", gradient_entries(plan, model.shapes, {s.name: (s.grad_numel,) for s in model.shapes})),
    )
    for phase, entries in exchanges:
        buckets = build_buckets(entries, element_size=FLOAT_BYTES, symmetric_comm=True)
        for r, seconds in enumerate(bucket_times(buckets, FLOAT_BYTES, network, kernels)):
            if r < world_size:
                per_rank[phase][r] += seconds
    slowest = {phase: max(values) for phase, values in per_rank.items()}
    factor_only = ("factor_computation", "factor_communication", "factor_update")
    inverse_only = ("decomposition", "decomposition_broadcast")
    period, counts = steps_per_period(KFACOptions(factor_update_steps=model.freq[0], inv_update_steps=model.freq[1]))
    out: dict[str, dict[str, float]] = {}
    for kind, (factor_step, inverse_step) in STEP_KINDS.items():
        if not counts[kind]:
            continue
        phases = {p: base[p] for p in ("compute", "grad_allreduce")}
        for phase in KFAC_PHASES:
            runs = (factor_step or phase not in factor_only) and (inverse_step or phase not in inverse_only)
            phases[phase] = slowest[phase] if runs else 0.0
        out[kind] = phases | {"step": sum(phases.values())}
    out["amortised"] = {p: sum(counts[k] * out[k][p] for k in out) / period for p in (*PHASES, "step")}
    return out
