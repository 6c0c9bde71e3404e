"""A latency-bandwidth (alpha-beta) model of one data-parallel training step, SGD and K-FAC, at any world size.

Pure functions (no timing here; :mod:`kfac_dist.app.bench.scaling_runs` measures the inputs). Per process:

- **kernels** (:class:`Kernels`), each a line fitted to measured times of the kernel in the form kfac_dist runs
  it: GEMM ``t = t_call + flops / rate``; memory-bound tensor ops ``t = t_call + bytes / bandwidth``; im2col
  (``F.unfold``) ``t = t_call + bytes written / rate``; finite checks ``t = t_call + bytes / rate``; ``eigh``
  ``t = overhead + c n^3``; and the model's forward + backward + optimizer step at the per-rank batch b, measured
  at W = 1 (linear in b between the batches measured). What the library spends beyond its counted kernels
  (Python, view ops) is measured, not counted: per layer and phase on a stack of tiny layers, and per gradient
  tensor of the flat gradient allreduce (:class:`Kernels`).
- **network** (:class:`Network`): a collective over g > 1 ranks takes ``alpha_op * ceil(log2 g) + beta_op * x``,
  where x is the most bytes any member sends or receives in it under the bandwidth-optimal accounting of
  :func:`kfac_dist.comm.accounting.collective_bytes` (the numbers the planner and ``comm_stats()`` use), so the
  latency term is that of a log-depth algorithm and the bandwidth term that of ring / scatter-allgather. A
  collective over one rank moves nothing but still costs the backend's local pass over the message (a line in
  its size). Ranks are separate machines with this network; nothing overlaps (an upper bound where the library
  overlaps factor reduction with backward).

A K-FAC step is the SGD step (compute + gradient allreduce) plus the K-FAC phases of :mod:`kfac_dist.timing`.
Each phase is modelled per layer from the kernel lines by counting the tensor operations kfac_dist runs
(:func:`layer_work`), and per fusion bucket for the exchanges: the buckets are laid out exactly as the library
and the planner lay them out (:mod:`kfac_dist.entries`, :func:`kfac_dist.comm.layout.build_buckets`), which
gives each collective its group and bytes, and each member a pack + unpack copy of the bucket. A phase's time is
its largest time over ranks (collectives synchronise the ranks); a step's time is the sum of its phases, and the
amortised step averages the kinds of step over one period of the schedule.

Not modelled: ranks waiting for each other's step-to-step jitter, and ranks that share a host slowing each other
down (memory bandwidth, caches, cores); numerical fallbacks (an ``eigh`` retried in float64) are not priced.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kfac_dist import timing
from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.comm.layout import Bucket, build_buckets
from kfac_dist.entries import decomposition_entries, factor_entries, gradient_entries
from kfac_dist.placement import LayerShape, Plan, build_plan
from kfac_dist.planner import STEP_KINDS, PlanOptions

__all__ = [
    "FLOAT_BYTES",
    "KFAC_PHASES",
    "LAYER_PHASES",
    "PHASES",
    "Kernels",
    "LayerWork",
    "LinearFit",
    "Network",
    "StepModel",
    "Work",
    "bucket_times",
    "fit_line",
    "layer_work",
    "predict_kfac",
    "predict_sgd",
]

#: K-FAC's phases: those :class:`kfac_dist.timing.PhaseTimer` measures.
KFAC_PHASES = timing.PHASES
#: The K-FAC phases with per-layer work (:func:`layer_work`).
LAYER_PHASES = ("factor_computation", "factor_update", "decomposition", "preconditioning", "kl_clip")
#: Every phase of a modelled step: "compute" is forward + backward + optimizer.
PHASES = ("compute", "grad_allreduce", *KFAC_PHASES)
FLOAT_BYTES = 4


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
        eigh: seconds vs n^3 of one symmetric eigendecomposition with eigenvectors.
        compute: forward + backward + optimizer seconds per step at the per-rank batches measured (W = 1; at
            least two batches).
        layer_overhead: ``{phase: seconds}`` a layer costs in each phase of :data:`LAYER_PHASES` beyond its
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
class Work:
    """Counted work of a phase: calls and FLOPs or bytes of each kernel, eigh sizes."""

    gemm_calls: float = 0.0
    gemm_flops: float = 0.0
    copy_calls: float = 0.0
    copy_bytes: float = 0.0
    im2col_calls: float = 0.0
    im2col_bytes: float = 0.0
    finite_calls: float = 0.0
    finite_bytes: float = 0.0
    eigh_sides: tuple[int, ...] = ()

    def times(self, blocks: int) -> Work:
        """This work done for each of `blocks` blocks."""
        return Work(
            self.gemm_calls * blocks,
            self.gemm_flops * blocks,
            self.copy_calls * blocks,
            self.copy_bytes * blocks,
            self.im2col_calls * blocks,
            self.im2col_bytes * blocks,
            self.finite_calls * blocks,
            self.finite_bytes * blocks,
            self.eigh_sides * blocks,
        )

    def seconds(self, kernels: Kernels) -> float:
        """Time of this work with `kernels`."""
        gemm = self.gemm_calls * kernels.gemm.intercept + self.gemm_flops * kernels.gemm.slope
        copy = self.copy_calls * kernels.copy.intercept + self.copy_bytes * kernels.copy.slope
        im2col = self.im2col_calls * kernels.im2col.intercept + self.im2col_bytes * kernels.im2col.slope
        finite = self.finite_calls * kernels.finite.intercept + self.finite_bytes * kernels.finite.slope
        return gemm + copy + im2col + finite + sum(kernels.eigh(float(n) ** 3) for n in self.eigh_sides)


@dataclass(frozen=True)
class LayerWork:
    """What the work model needs of a preconditioned layer (one block's sides, blocks, output locations).

    `im2col`: whether its input rows go through ``F.unfold`` (a convolution with a kernel larger than 1x1; a
    pointwise convolution's rows are its strided input, a linear layer's its input).
    """

    name: str
    a: int
    g: int
    blocks: int
    locations: int
    im2col: bool = True


def layer_work(layer: LayerWork, phase: str, batch: int) -> Work:
    """Operations kfac_dist runs for one layer in one K-FAC phase at per-rank batch `batch` (all its blocks).

    Counted from the library's code (R = batch x locations rows; bytes are read + written):

    - factors: the im2col of A's rows (layers with ``im2col``), the pad and permute copies of the rows of A and
      G, the scaling of G's rows, two Gram GEMMs ``rows^T rows`` and the two normalising divisions (6
      memory-bound ops);
    - factor update: ``isfinite(.).all()`` of A and G, their ``&``, and two running averages (``mul`` +
      ``add_`` each);
    - decomposition: ``eigh`` of A and G, finite checks of their eigenvalues and eigenvectors, the clamps;
    - preconditioning: four GEMMs and the eigenvalue outer product, damping and division;
    - KL-clip: the inner product (``mul`` + ``sum``), the scaling and the copy into ``.grad``.

    Exchange phases have no per-layer work here (see :func:`bucket_times`).
    """
    a, g, rows = layer.a, layer.g, batch * layer.locations
    squares, ag = float(a * a + g * g), float(a * g)
    works = {
        "factor_computation": Work(
            gemm_calls=2,
            gemm_flops=2.0 * rows * squares,
            copy_calls=6,
            copy_bytes=FLOAT_BYTES * (2.0 * rows * a + 4.0 * rows * g + 2.0 * squares),
            im2col_calls=float(layer.im2col),
            im2col_bytes=FLOAT_BYTES * rows * a * layer.im2col,
        ),
        "factor_update": Work(
            copy_calls=5, copy_bytes=FLOAT_BYTES * 5.0 * squares, finite_calls=2, finite_bytes=FLOAT_BYTES * squares
        ),
        "decomposition": Work(
            copy_calls=2,
            copy_bytes=FLOAT_BYTES * 2.0 * (a + g),
            finite_calls=4,
            finite_bytes=FLOAT_BYTES * (squares + a + g),
            eigh_sides=(a, g),
        ),
        "preconditioning": Work(
            gemm_calls=4, gemm_flops=4.0 * ag * (a + g), copy_calls=3, copy_bytes=FLOAT_BYTES * 6.0 * ag
        ),
        "kl_clip": Work(copy_calls=4, copy_bytes=FLOAT_BYTES * 8.0 * ag),
    }
    return works[phase].times(layer.blocks) if phase in works else Work()


@dataclass(frozen=True)
class StepModel:
    """A model as the step model sees it.

    Args:
        name: a label.
        layers: the preconditioned layers' work shapes, in registration order.
        shapes: the same layers as placement sees them (for the plan and the bucket layout).
        param_tensors: parameter tensors of the whole model (the gradient allreduce copies each).
        param_numel: parameters of the whole model (the gradient allreduce moves them all).
        freq: (factor, inverse) periods of K-FAC.
    """

    name: str
    layers: tuple[LayerWork, ...]
    shapes: tuple[LayerShape, ...]
    param_tensors: int
    param_numel: int
    freq: tuple[int, int] = (10, 100)
    _plans: dict[tuple[int, float], Plan] = field(default_factory=dict, repr=False, compare=False)

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
        local = Work(copy_calls=2.0 * len(bucket.slots) + 1, copy_bytes=3.0 * nbytes).seconds(kernels)  # pack, unpack
        for rank in group:
            out[rank] += seconds + local
    return out


def _grad_allreduce(model: StepModel, world_size: int, network: Network, kernels: Kernels) -> float:
    """Flatten the gradients, allreduce them (one flat buffer), copy them back."""
    nbytes = model.param_numel * FLOAT_BYTES
    moved = collective_bytes("allreduce", nbytes, range(world_size), 0)
    local = Work(copy_calls=model.param_tensors + 2, copy_bytes=4.0 * nbytes).seconds(kernels)
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
    model: StepModel,
    world_size: int,
    batch: int,
    kernels: Kernels,
    network: Network,
    fraction: float = 1.0,
    factor_comm: str = "owner",
    symmetric_comm: bool = True,
) -> dict[str, dict[str, float]]:
    """Seconds per phase of each kind of K-FAC step and amortised over one period of ``model.freq``.

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
        for phase in LAYER_PHASES:
            seconds = layer_work(layer, phase, batch).seconds(kernels) + kernels.layer_overhead.get(phase, 0.0)
            for r in ranks:
                keeps = factor_comm == "allreduce" or layer.name in owned[r]
                mine = {"decomposition": layer.name in owned[r], "factor_update": keeps}
                mine["preconditioning"] = layer.name in worked[r]
                if mine.get(phase, True):
                    per_rank[phase][r] += seconds
    exchanges = (
        ("factor_communication", factor_entries(plan, model.shapes, factor_comm)),
        ("decomposition_broadcast", decomposition_entries(plan, model.shapes, "eigen")),
        ("gradient_broadcast", gradient_entries(plan, model.shapes, {s.name: (s.grad_numel,) for s in model.shapes})),
    )
    for phase, entries in exchanges:
        buckets = build_buckets(entries, element_size=FLOAT_BYTES, symmetric_comm=symmetric_comm)
        for r, seconds in enumerate(bucket_times(buckets, FLOAT_BYTES, network, kernels)):
            if r < world_size:
                per_rank[phase][r] += seconds
    slowest = {phase: max(values) for phase, values in per_rank.items()}
    factor_only = ("factor_computation", "factor_communication", "factor_update")
    inverse_only = ("decomposition", "decomposition_broadcast")
    options = PlanOptions(factor_update_steps=model.freq[0], inv_update_steps=model.freq[1])
    counts = options.steps_per_period()
    out: dict[str, dict[str, float]] = {}
    for kind, (factor_step, inverse_step) in STEP_KINDS.items():
        if not counts[kind]:
            continue
        phases = {p: base[p] for p in ("compute", "grad_allreduce")}
        for phase in KFAC_PHASES:
            runs = (factor_step or phase not in factor_only) and (inverse_step or phase not in inverse_only)
            phases[phase] = slowest[phase] if runs else 0.0
        out[kind] = phases | {"step": sum(phases.values())}
    period = options.period
    out["amortised"] = {p: sum(counts[k] * out[k][p] for k in out) / period for p in (*PHASES, "step")}
    return out
