"""Closed-form accounting of a :class:`~kfac_dist.placement.Plan`: bytes per step, memory and eigh load.

This is what ``kfac-dist plan`` prints, and the byte counts the `Communicator` records in a real run must
equal these numbers exactly. Pure Python: no tensors, no torch.

Byte convention (payload, algorithm-agnostic, per rank; ``n`` = payload bytes, ``k`` = group size):

- allreduce over a group: every member sent ``n`` and received ``n`` (0 if ``k == 1``);
- reduce to dst: every member but dst sent ``n``; dst received ``n * (k - 1)``;
- broadcast from src: src sent ``n * (k - 1)``; every other member received ``n``.

Traffic of one K-FAC step, per layer (``a``, ``g`` = factor sides, ``b`` = blocks, W = world size, G = grad
workers per layer). Categories are the ``category`` names of the Communicator calls:

- ``"factor_reduce"`` (factor steps): with ``factor_comm="owner"`` the batch factors A and G are reduced
  (averaged) to the layer's owner over the world; with ``"allreduce"`` (KAISA) they are allreduced over the
  world. Payload ``b * (tri(a) + tri(g))`` elements of ``factor_bytes``, where ``tri(n) = n(n+1)/2`` with
  ``symmetric_comm`` (upper triangles) and ``n^2`` without; a diagonal A is ``a`` elements either way.
- ``"decomposition_broadcast"`` (inverse steps, only if ``G > 1``): the owner broadcasts to its G-1 fellow
  grad workers ``b * (a^2 + a + g^2 + g)`` elements (``compute_method="eigen"``: Q_A, l_A, Q_G, l_G;
  eigenvectors are never packed) or ``b * (tri(a) + tri(g))`` (``"inverse"``: A^-1, G^-1) of ``inv_bytes``; a
  diagonal A sends only its ``a`` values (eigen: no Q_A).
- ``"gradient_broadcast"`` (every step, only if ``G < W``): for each ``(src, receivers)`` of the plan, ``src``
  broadcasts ``grad_numel`` elements of ``grad_bytes`` to the receivers.

Memory (:func:`memory_bytes`, full square storage): ``"factors"`` the running averages A, G (a diagonal A as
its diagonal) in ``factor_bytes``, held by the owner (``"owner"``) or by every rank (``"allreduce"``);
``"decompositions"`` held by every grad worker in ``inv_bytes`` (eigen: ``Q_A, l_A, Q_G, l_G``; inverse:
``A^-1, G^-1``); ``"buffers"`` the batch contributions of A and G of every layer, held by every rank during a
factor step, in ``factor_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from kfac_dist.placement import LayerShape, Plan, compute_cost

CATEGORIES = ("factor_reduce", "decomposition_broadcast", "gradient_broadcast")
MEMORY_CATEGORIES = ("factors", "decompositions", "buffers")
COMPUTE_METHODS = ("eigen", "inverse")
FACTOR_COMMS = ("owner", "allreduce")

Traffic = dict[int, dict[str, dict[str, int]]]
"""``{rank: {category: {"sent": bytes, "received": bytes}}}``."""


def _tri(n: int, packed: bool) -> int:
    return n * (n + 1) // 2 if packed else n * n


def factor_comm_numel(shape: LayerShape, *, symmetric_comm: bool = True) -> int:
    """Elements of A and G that one rank contributes to the factor reduction of a layer."""
    a = shape.a_side if shape.a_diagonal else _tri(shape.a_side, symmetric_comm)
    return shape.blocks * (a + _tri(shape.g_side, symmetric_comm))


def decomposition_comm_numel(shape: LayerShape, *, compute_method: str = "eigen", symmetric_comm: bool = True) -> int:
    """Elements of the decomposition that the owner of a layer broadcasts to each fellow grad worker."""
    a, g = shape.a_side, shape.g_side
    if compute_method == "eigen":
        return shape.blocks * ((a if shape.a_diagonal else a * a + a) + g * g + g)
    return shape.blocks * ((a if shape.a_diagonal else _tri(a, symmetric_comm)) + _tri(g, symmetric_comm))


def factor_storage_numel(shape: LayerShape) -> int:
    """Elements of the stored factors A and G of a layer (full square; a diagonal A as its diagonal)."""
    return factor_comm_numel(shape, symmetric_comm=False)


def decomposition_storage_numel(shape: LayerShape, *, compute_method: str = "eigen") -> int:
    """Elements of the decomposition a grad worker stores for a layer (full square)."""
    return decomposition_comm_numel(shape, compute_method=compute_method, symmetric_comm=False)


def _check_choice(option: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1; got {value!r}")


def _check_flags(**flags: object) -> None:
    for option, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be True or False; got {value!r}")


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


def step_bytes(
    plan: Plan,
    layers: Sequence[LayerShape],
    *,
    factor_step: bool = True,
    inverse_step: bool = True,
    compute_method: str = "eigen",
    factor_comm: str = "owner",
    symmetric_comm: bool = True,
    factor_bytes: int = 4,
    inv_bytes: int = 4,
    grad_bytes: int = 4,
) -> Traffic:
    """Bytes each rank sends and receives in one K-FAC step, per category.

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        factor_step: whether the step reduces factors.
        inverse_step: whether the step decomposes and broadcasts decompositions.
        compute_method: ``"eigen"`` or ``"inverse"``.
        factor_comm: ``"owner"`` (reduce to the owner) or ``"allreduce"`` (KAISA).
        symmetric_comm: send symmetric matrices as upper triangles.
        factor_bytes: bytes per factor element.
        inv_bytes: bytes per decomposition element.
        grad_bytes: bytes per gradient element.

    Returns:
        ``{rank: {category: {"sent": int, "received": int}}}`` for every rank and every category of
        `CATEGORIES` (zeros for phases that do not run).
    """
    _check_choice("compute_method", compute_method, COMPUTE_METHODS)
    _check_choice("factor_comm", factor_comm, FACTOR_COMMS)
    _check_flags(factor_step=factor_step, inverse_step=inverse_step, symmetric_comm=symmetric_comm)
    _check_positive_int("factor_bytes", factor_bytes)
    _check_positive_int("inv_bytes", inv_bytes)
    _check_positive_int("grad_bytes", grad_bytes)
    shapes = _shapes_in_plan_order(plan, layers)
    w = plan.world_size
    out = _empty_traffic(w)

    def add(rank: int, category: str, sent: int, received: int) -> None:
        out[rank][category]["sent"] += sent
        out[rank][category]["received"] += received

    for lp, shape in zip(plan.layers, shapes, strict=True):
        if factor_step and w > 1:
            n = factor_comm_numel(shape, symmetric_comm=symmetric_comm) * factor_bytes
            for r in range(w):
                if factor_comm == "allreduce":
                    add(r, "factor_reduce", n, n)
                elif r == lp.owner:
                    add(r, "factor_reduce", 0, n * (w - 1))
                else:
                    add(r, "factor_reduce", n, 0)
        if inverse_step and len(lp.grad_workers) > 1:
            n = decomposition_comm_numel(shape, compute_method=compute_method, symmetric_comm=symmetric_comm)
            n *= inv_bytes
            for r in lp.grad_workers:
                if r == lp.owner:
                    add(r, "decomposition_broadcast", n * (len(lp.grad_workers) - 1), 0)
                else:
                    add(r, "decomposition_broadcast", 0, n)
        n = shape.grad_numel * grad_bytes
        for src, receivers in lp.grad_broadcasts:
            add(src, "gradient_broadcast", n * len(receivers), 0)
            for r in receivers:
                add(r, "gradient_broadcast", 0, n)
    return out


def amortised_bytes(
    plan: Plan,
    layers: Sequence[LayerShape],
    *,
    factor_update_steps: int,
    inv_update_steps: int,
    compute_method: str = "eigen",
    factor_comm: str = "owner",
    symmetric_comm: bool = True,
    factor_bytes: int = 4,
    inv_bytes: int = 4,
    grad_bytes: int = 4,
) -> dict[int, dict[str, dict[str, float]]]:
    """Average bytes per rank per step over a schedule, per category.

    Step k (k = 0, 1, ...) is a factor step when ``k % factor_update_steps == 0`` and an inverse step when
    ``k % inv_update_steps == 0``; the two are independent. The average is taken exactly over one period of
    ``lcm(factor_update_steps, inv_update_steps)`` steps, then returned as floats.

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        factor_update_steps: steps between factor updates (>= 1).
        inv_update_steps: steps between decompositions (>= 1).
        compute_method: as in :func:`step_bytes`.
        factor_comm: as in :func:`step_bytes`.
        symmetric_comm: as in :func:`step_bytes`.
        factor_bytes: as in :func:`step_bytes`.
        inv_bytes: as in :func:`step_bytes`.
        grad_bytes: as in :func:`step_bytes`.

    Returns:
        ``{rank: {category: {"sent": float, "received": float}}}``.
    """
    _check_positive_int("factor_update_steps", factor_update_steps)
    _check_positive_int("inv_update_steps", inv_update_steps)
    period = math.lcm(factor_update_steps, inv_update_steps)
    total: dict[int, dict[str, dict[str, Fraction]]] = {
        r: {c: {"sent": Fraction(0), "received": Fraction(0)} for c in CATEGORIES} for r in range(plan.world_size)
    }
    kinds: dict[tuple[bool, bool], int] = {}
    for k in range(period):
        kind = (k % factor_update_steps == 0, k % inv_update_steps == 0)
        kinds[kind] = kinds.get(kind, 0) + 1
    for (factor, inverse), count in sorted(kinds.items()):
        traffic = step_bytes(
            plan,
            layers,
            factor_step=factor,
            inverse_step=inverse,
            compute_method=compute_method,
            factor_comm=factor_comm,
            symmetric_comm=symmetric_comm,
            factor_bytes=factor_bytes,
            inv_bytes=inv_bytes,
            grad_bytes=grad_bytes,
        )
        for r, per_category in traffic.items():
            for c, counts in per_category.items():
                for direction, value in counts.items():
                    total[r][c][direction] += Fraction(value * count, period)
    return {r: {c: {d: float(v) for d, v in counts.items()} for c, counts in per.items()} for r, per in total.items()}


def memory_bytes(
    plan: Plan,
    layers: Sequence[LayerShape],
    *,
    factor_comm: str = "owner",
    compute_method: str = "eigen",
    factor_bytes: int = 4,
    inv_bytes: int = 4,
) -> dict[int, dict[str, int]]:
    """Second-order memory each rank holds, per category of `MEMORY_CATEGORIES` (see the module docstring).

    Args:
        plan: the placement.
        layers: the shapes of the plan's layers (any order).
        factor_comm: ``"owner"`` (factors live on the owner) or ``"allreduce"`` (on every rank).
        compute_method: ``"eigen"`` or ``"inverse"``.
        factor_bytes: bytes per factor element.
        inv_bytes: bytes per decomposition element.

    Returns:
        ``{rank: {"factors": int, "decompositions": int, "buffers": int}}``.
    """
    _check_choice("compute_method", compute_method, COMPUTE_METHODS)
    _check_choice("factor_comm", factor_comm, FACTOR_COMMS)
    _check_positive_int("factor_bytes", factor_bytes)
    _check_positive_int("inv_bytes", inv_bytes)
    shapes = _shapes_in_plan_order(plan, layers)
    out = {r: dict.fromkeys(MEMORY_CATEGORIES, 0) for r in range(plan.world_size)}
    for lp, shape in zip(plan.layers, shapes, strict=True):
        factors = factor_storage_numel(shape) * factor_bytes
        for r in range(plan.world_size):
            out[r]["buffers"] += factors
            if factor_comm == "allreduce" or r == lp.owner:
                out[r]["factors"] += factors
        decomposition = decomposition_storage_numel(shape, compute_method=compute_method) * inv_bytes
        for r in lp.grad_workers:
            out[r]["decompositions"] += decomposition
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
