"""What each exchange of a K-FAC step sends: its fusion entries, in order, from the :class:`~.placement.Plan`.

Pure Python (no torch). :mod:`kfac_dist.exchange` builds its fusion plans from these lists at run time and
:mod:`kfac_dist.costs` lays out the same buckets in closed form, so the bytes a real run records and the bytes
the closed form predicts come from one description of what moves. Entries follow the plan's layer order (the
registration order of the preconditioner):

- :func:`factor_entries`: each layer's batch A and G, in reverse order (the order backward finishes layers),
  reduced into the owner (``factor_comm="owner"``) or allreduced (``"allreduce"``, KAISA), averaged, over the
  world;
- :func:`decomposition_entries`: each layer's decomposition (:func:`decomposition_fields`), broadcast by the
  owner inside the grad-worker group (only layers with more than one grad worker);
- :func:`gradient_entries`: each layer's preconditioned gradient, broadcast by every grad worker to the ranks the
  plan assigns it (only layers with fewer grad workers than ranks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kfac_dist.comm.layout import CollectiveOp, FusionEntry, Target
from kfac_dist.placement import LayerShape, Plan

FACTOR_REDUCE = "factor_reduce"
DECOMPOSITION_BROADCAST = "decomposition_broadcast"
GRADIENT_BROADCAST = "gradient_broadcast"
#: The byte-accounting categories of the three exchanges of a step, in the order a step runs them.
CATEGORIES = (FACTOR_REDUCE, DECOMPOSITION_BROADCAST, GRADIENT_BROADCAST)

Field = tuple[str, tuple[int, ...], bool]
"""``(field name, shape, symmetric)`` of one tensor of a layer."""


def a_shape(shape: LayerShape) -> tuple[int, ...]:
    """Shape of a layer's A factor: ``(b, a)`` when diagonal, else ``(b, a, a)``."""
    if shape.a_diagonal:
        return (shape.blocks, shape.a_side)
    return (shape.blocks, shape.a_side, shape.a_side)


def g_shape(shape: LayerShape) -> tuple[int, ...]:
    """Shape of a layer's G factor, ``(b, g, g)``."""
    return (shape.blocks, shape.g_side, shape.g_side)


def factor_fields(shape: LayerShape) -> list[Field]:
    """The factors A and G of a layer (a diagonal A is not symmetric: it travels as its diagonal)."""
    return [("A", a_shape(shape), not shape.a_diagonal), ("G", g_shape(shape), True)]


def decomposition_fields(shape: LayerShape, method: str) -> list[Field]:
    """The tensors of a layer's decomposition, in a fixed order.

    ``"eigen"``: Q_A (none for a diagonal A), l_A, Q_G, l_G (eigenbases are not symmetric); ``"inverse"``:
    A^-1 and G^-1 (symmetric, but a diagonal A^-1 is its diagonal).
    """
    b, n, m = shape.blocks, shape.a_side, shape.g_side
    if method == "eigen":
        fields: list[Field] = [] if shape.a_diagonal else [("q_a", (b, n, n), False)]
        return [*fields, ("l_a", (b, n), False), ("q_g", (b, m, m), False), ("l_g", (b, m), False)]
    return [("a_inv", a_shape(shape), not shape.a_diagonal), ("g_inv", g_shape(shape), True)]


def _in_plan_order(plan: Plan, shapes: Sequence[LayerShape]) -> list[LayerShape]:
    by_name = {s.name: s for s in shapes}
    return [by_name[lp.name] for lp in plan.layers]


def factor_entries(plan: Plan, shapes: Sequence[LayerShape], factor_comm: str) -> list[FusionEntry]:
    """The factor reduction: keys ``"<layer>/A"`` and ``"<layer>/G"``, layers in reverse plan order."""
    world = tuple(range(plan.world_size))
    entries = []
    for shape in reversed(_in_plan_order(plan, shapes)):
        if factor_comm == "owner":
            target = Target(CollectiveOp.REDUCE, world, root=plan.layer(shape.name).owner, average=True)
        else:
            target = Target(CollectiveOp.ALLREDUCE, world, average=True)
        entries += [FusionEntry(f"{shape.name}/{f}", s, target, sym) for f, s, sym in factor_fields(shape)]
    return entries


def decomposition_entries(plan: Plan, shapes: Sequence[LayerShape], method: str) -> list[FusionEntry]:
    """The decomposition broadcast: keys ``"<layer>/<field>"`` (:func:`decomposition_fields`)."""
    entries = []
    for shape in _in_plan_order(plan, shapes):
        layer = plan.layer(shape.name)
        if len(layer.grad_workers) > 1:
            target = Target(CollectiveOp.BROADCAST, layer.grad_workers, root=layer.owner)
            fields = decomposition_fields(shape, method)
            entries += [FusionEntry(f"{shape.name}/{f}", s, target, sym) for f, s, sym in fields]
    return entries


def gradient_entries(
    plan: Plan, shapes: Sequence[LayerShape], grad_shapes: Mapping[str, tuple[int, ...]]
) -> list[FusionEntry]:
    """The gradient broadcast: keys ``"<layer>@<src>"``, shaped as `grad_shapes` says (by layer name).

    Only the number of elements of a gradient matters to the bucket layout.
    """
    entries = []
    for shape in _in_plan_order(plan, shapes):
        for src, receivers in plan.layer(shape.name).grad_broadcasts:
            target = Target(CollectiveOp.BROADCAST, (src, *receivers), root=src)
            entries.append(FusionEntry(f"{shape.name}@{src}", grad_shapes[shape.name], target))
    return entries
