"""Closed-form accounting of a :class:`~kfac_dist.placement.Plan`: bytes per step, memory and eigh load.

This is what ``kfac-dist plan`` prints, and the byte counts the `Communicator` records in a real run must
equal these numbers exactly. No tensors. The sizes of a decomposition are its compute method's fields
(:mod:`kfac_dist.methods`), the same list the exchange sends.

Bytes are counted per fusion bucket, exactly as a run sends them: each phase's entries
(:mod:`kfac_dist.entries`, the lists the runtime uses) are laid out into buckets by
:func:`~kfac_dist.comm.layout.build_buckets` with the same ``bucket_cap_mb``, ``symmetric_comm`` and element
size, and every rank of a bucket's group is charged :func:`~kfac_dist.comm.accounting.collective_bytes` of
that bucket (the bandwidth-optimal alpha-beta model; not linear in the size, hence per bucket). Categories are
the ``category`` names of the Communicator calls (``a``, ``g`` = factor sides, ``b`` = blocks, W = world
size, G = grad workers per layer):

- ``"factor_reduce"`` (factor steps): with ``factor_comm="owner"`` the batch factors A and G are reduced
  (averaged) to the layer's owner over the world, one fused reduce per owner; with ``"allreduce"`` (KAISA) they
  are allreduced over the world. ``b * (tri(a) + tri(g))`` elements of ``factor_bytes`` per layer, where
  ``tri(n) = n(n+1)/2`` with ``symmetric_comm`` (upper triangles) and ``n^2`` without; a diagonal A is ``a``
  elements either way.
- ``"decomposition_broadcast"`` (inverse steps, only if ``G > 1``): the owner broadcasts inside the grad-worker
  group ``b * (a^2 + a + g^2 + g)`` elements (``compute_method="eigen"``: Q_A, l_A, Q_G, l_G; eigenvectors
  are never packed) or ``b * (tri(a) + tri(g))`` (``"inverse"``: A^-1, G^-1) of ``inv_bytes``; a diagonal A
  sends only its ``a`` values (eigen: no Q_A).
- ``"gradient_broadcast"`` (every step, only if ``G < W``): for each ``(src, receivers)`` of the plan, ``src``
  broadcasts ``grad_numel`` elements of ``grad_bytes`` to the receivers.

Memory (:func:`memory_bytes`): ``"factors"`` the running averages A, G (full square; a diagonal A as its
diagonal) in ``factor_bytes``, held by the owner (``"owner"``) or by every rank (``"allreduce"``);
``"decompositions"`` held by every grad worker in ``inv_bytes`` (eigen: ``Q_A, l_A, Q_G, l_G``; inverse:
``A^-1, G^-1``, full square); ``"buffers"`` the fusion buckets of the factor reduction (every rank holds all of
them during a factor step: the sum of their sizes times ``factor_bytes``, packed with ``symmetric_comm``). A
layer's full-square batch sums are freed as soon as backward copies them into the buckets, so they are not
counted.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction

from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.comm.layout import Bucket, FusionEntry, build_buckets
from kfac_dist.entries import (
    CATEGORIES,
    DECOMPOSITION_BROADCAST,
    FACTOR_REDUCE,
    GRADIENT_BROADCAST,
    decomposition_entries,
    factor_entries,
    factor_fields,
    gradient_entries,
)
from kfac_dist.methods import get_method, wire_numel
from kfac_dist.options import DTYPES, KFACOptions, check_flag
from kfac_dist.placement import LayerShape, Plan, compute_cost
from kfac_dist.schedule import DecompositionSchedule

MEMORY_CATEGORIES = ("factors", "decompositions", "buffers")

Traffic = dict[int, dict[str, dict[str, int]]]
"""``{rank: {category: {"sent": bytes, "received": bytes}}}``."""


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per element of the factors, the decompositions and the gradients (4: float32).

    :meth:`of` reads the first two from :class:`~kfac_dist.options.KFACOptions`' dtypes.
    """

    factor: int = 4
    inv: int = 4
    grad: int = 4

    def __post_init__(self) -> None:
        """Reject a size that is not a positive integer, naming it."""
        for key in ("factor", "inv", "grad"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}_bytes must be an integer >= 1; got {value!r}")

    @classmethod
    def of(cls, options: KFACOptions, grad_dtype: str = "float32") -> ElementBytes:
        """The sizes a run with ``options`` uses for gradients of ``grad_dtype`` (a name of ``options.DTYPES``)."""
        grad = DTYPES[grad_dtype]
        factor = options.factor_dtype_for(grad).itemsize
        return cls(factor=factor, inv=options.inverse_dtype().itemsize, grad=grad.itemsize)


def factor_comm_numel(shape: LayerShape, *, symmetric_comm: bool = True) -> int:
    """Elements of A and G that one rank contributes to the factor reduction of a layer."""
    return sum(wire_numel(s, sym, symmetric_comm) for _, s, sym in factor_fields(shape))


def factor_storage_numel(shape: LayerShape) -> int:
    """Elements of the stored factors A and G of a layer (full square; a diagonal A as its diagonal)."""
    return factor_comm_numel(shape, symmetric_comm=False)


def _shapes_in_plan_order(plan: Plan, layers: Sequence[LayerShape]) -> list[LayerShape]:
    by_name = {shape.name: shape for shape in layers}
    planned = [lp.name for lp in plan.layers]
    if len(by_name) != len(layers) or set(by_name) != set(planned):
        missing = sorted(set(planned) - set(by_name))
        extra = sorted(set(by_name) - set(planned))
        raise ValueError(f"layers must match the plan's layers; missing: {missing}, not in the plan: {extra}")
    return [by_name[name] for name in planned]


def _empty_traffic(world_size: int) -> Traffic:
    return {r: {c: {"sent": 0, "received": 0} for c in CATEGORIES} for r in range(world_size)}


def _buckets(entries: Sequence[FusionEntry], element_size: int, symmetric_comm: bool, cap: float) -> tuple[Bucket, ...]:
    """The buckets :class:`~kfac_dist.comm.fusion.FusionPlan` lays `entries` out in at run time."""
    return build_buckets(entries, element_size=element_size, bucket_cap_mb=cap, symmetric_comm=symmetric_comm)


def _charge(out: Traffic, category: str, buckets: Sequence[Bucket], element_size: int) -> None:
    """Add to every rank the bytes it sends and receives in the collectives of `buckets`."""
    for bucket in buckets:
        target, n = bucket.target, bucket.numel * element_size
        for rank in target.group:
            sent, received = collective_bytes(target.op.value, n, target.group, rank, target.root)
            out[rank][category]["sent"] += sent
            out[rank][category]["received"] += received


def step_bytes(
    plan: Plan,
    layers: Sequence[LayerShape],
    options: KFACOptions | None = None,
    *,
    factor_step: bool = True,
    inverse_step: bool = True,
    decomposed: Collection[str] | None = None,
    sizes: ElementBytes | None = None,
) -> Traffic:
    """Bytes each rank sends and receives in one K-FAC step, per category.

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        options: K-FAC's options (``compute_method``, ``factor_comm``, ``symmetric_comm``, ``bucket_cap_mb``);
            default: every default.
        factor_step: whether the step reduces factors.
        inverse_step: whether the step decomposes and broadcasts decompositions.
        decomposed: on an inverse step, the layers it decomposes (default: all; ``inv_stagger`` decomposes some:
            :meth:`kfac_dist.schedule.DecompositionSchedule.due`).
        sizes: bytes per element (default: 4 each).

    Returns:
        ``{rank: {category: {"sent": int, "received": int}}}`` for every rank and every category of
        `CATEGORIES` (zeros for phases that do not run).
    """
    o, sizes = options or KFACOptions(), sizes or ElementBytes()
    check_flag("factor_step", factor_step)
    check_flag("inverse_step", inverse_step)
    shapes = _shapes_in_plan_order(plan, layers)
    out = _empty_traffic(plan.world_size)
    phases: list[tuple[str, list[FusionEntry], int]] = []
    if factor_step:
        phases.append((FACTOR_REDUCE, factor_entries(plan, shapes, o.factor_comm), sizes.factor))
    if inverse_step:
        method = get_method(o.compute_method)
        phases.append((DECOMPOSITION_BROADCAST, decomposition_entries(plan, shapes, method, decomposed), sizes.inv))
    gradients = gradient_entries(plan, shapes, {s.name: (s.grad_numel,) for s in shapes})
    phases.append((GRADIENT_BROADCAST, gradients, sizes.grad))
    for category, entries, element_size in phases:
        _charge(out, category, _buckets(entries, element_size, o.symmetric_comm, o.bucket_cap_mb), element_size)
    return out


def amortised_bytes(
    plan: Plan, layers: Sequence[LayerShape], options: KFACOptions | None = None, *, sizes: ElementBytes | None = None
) -> dict[int, dict[str, dict[str, float]]]:
    """Average bytes per rank per step over the schedule of ``options``, per category.

    Step k (k = 0, 1, ...) is a factor step when ``k % factor_update_steps == 0`` and decomposes the layers
    :meth:`~kfac_dist.schedule.DecompositionSchedule.due` at k (callables: their values at step 0). The average is
    taken exactly over one period of ``lcm(factor_update_steps, inv_update_steps)`` steps in steady state (the
    second period: step 0 decomposes every layer even when staggered), then returned as floats.

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        options: as in :func:`step_bytes`, with the frequencies.
        sizes: as in :func:`step_bytes`.

    Returns:
        ``{rank: {category: {"sent": float, "received": float}}}``.
    """
    o = options or KFACOptions()
    factor_update_steps, inv_update_steps = int(o.value("factor_update_steps", 0)), int(o.value("inv_update_steps", 0))
    period = math.lcm(factor_update_steps, inv_update_steps)
    total: dict[int, dict[str, dict[str, Fraction]]] = {
        r: {c: {"sent": Fraction(0), "received": Fraction(0)} for c in CATEGORIES} for r in range(plan.world_size)
    }
    schedule = DecompositionSchedule(plan, layers, o.at_step(0))
    kinds: dict[tuple[bool, tuple[str, ...]], int] = {}
    for k in range(period, 2 * period):
        kind = (k % factor_update_steps == 0, schedule.due(k))
        kinds[kind] = kinds.get(kind, 0) + 1
    for (factor, due), count in sorted(kinds.items()):
        traffic = step_bytes(
            plan, layers, o, factor_step=factor, inverse_step=bool(due), decomposed=set(due), sizes=sizes
        )
        for r, per_category in traffic.items():
            for c, counts in per_category.items():
                for direction, value in counts.items():
                    total[r][c][direction] += Fraction(value * count, period)
    return {r: {c: {d: float(v) for d, v in counts.items()} for c, counts in per.items()} for r, per in total.items()}


def memory_bytes(
    plan: Plan, layers: Sequence[LayerShape], options: KFACOptions | None = None, *, sizes: ElementBytes | None = None
) -> dict[int, dict[str, int]]:
    """Second-order memory each rank holds, per category of `MEMORY_CATEGORIES` (see the module docstring).

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        options: K-FAC's options (``factor_comm``: factors on the owner or on every rank; ``compute_method``;
            ``symmetric_comm`` and ``bucket_cap_mb`` of the factor-reduction buckets); default: every default.
        sizes: bytes per element (default: 4 each).

    Returns:
        ``{rank: {"factors": int, "decompositions": int, "buffers": int}}``.
    """
    o, sizes = options or KFACOptions(), sizes or ElementBytes()
    method = get_method(o.compute_method)
    shapes = _shapes_in_plan_order(plan, layers)
    out = {r: dict.fromkeys(MEMORY_CATEGORIES, 0) for r in range(plan.world_size)}
    for lp, shape in zip(plan.layers, shapes, strict=True):
        factors = factor_storage_numel(shape) * sizes.factor
        for r in range(plan.world_size):
            if o.factor_comm == "allreduce" or r == lp.owner:
                out[r]["factors"] += factors
        decomposition = method.storage_numel(shape) * sizes.inv
        for r in lp.grad_workers:
            out[r]["decompositions"] += decomposition
    entries = factor_entries(plan, shapes, o.factor_comm)
    for bucket in _buckets(entries, sizes.factor, o.symmetric_comm, o.bucket_cap_mb):
        for r in bucket.target.group:
            out[r]["buffers"] += bucket.held_numel * sizes.factor
    return out


@dataclass(frozen=True)
class DecompositionLoad:
    """Decomposition work per rank, in units of :func:`~kfac_dist.placement.compute_cost` (eigh-like flops).

    Args:
        per_rank: the summed cost of the layers each rank owns, indexed by rank.
    """

    per_rank: tuple[int, ...]

    @property
    def max(self) -> int:
        """The largest load (the rank everyone waits for)."""
        return max(self.per_rank)

    @property
    def mean(self) -> float:
        """The average load over ranks."""
        return sum(self.per_rank) / len(self.per_rank)

    @property
    def imbalance(self) -> float:
        """``max / mean`` (1.0 is perfect balance; 1.0 as well when there is no work)."""
        return self.max / self.mean if self.mean > 0 else 1.0


def decomposition_load(plan: Plan, layers: Sequence[LayerShape]) -> DecompositionLoad:
    """The decomposition cost each rank carries under `plan`."""
    shapes = _shapes_in_plan_order(plan, layers)
    load = [0] * plan.world_size
    for lp, shape in zip(plan.layers, shapes, strict=True):
        load[lp.owner] += compute_cost(shape)
    return DecompositionLoad(tuple(load))
