"""What each exchange of a K-FAC step sends: its fusion entries, in order, from the :class:`~.placement.Plan`.

No tensors. :mod:`kfac_dist.exchange` builds its fusion plans from these lists at run time and
:mod:`kfac_dist.costs` lays out the same buckets in closed form, so the bytes a real run records and the bytes
the closed form predicts come from one description of what moves. Entries follow the plan's layer order (the
registration order of the preconditioner):

- :func:`factor_entries`: each layer's batch A and G, in reverse order (the order backward finishes layers),
  reduced into the owner (``factor_comm="owner"``) or allreduced (``"allreduce"``, KAISA), averaged, over the
  world;
- :func:`decomposition_entries`: each layer's decomposition (its compute method's fields), broadcast by the
  owner inside the grad-worker group (only layers with more than one grad worker);
- :func:`gradient_entries`: each layer's preconditioned gradient, broadcast by every grad worker to the ranks the
  plan assigns it (only layers with fewer grad workers than ranks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from kfac_dist.comm.layout import CollectiveOp, FusionEntry, Target
from kfac_dist.methods import ComputeMethod, Field
from kfac_dist.placement import LayerShape, Plan

FACTOR_REDUCE = "factor_reduce"
DECOMPOSITION_BROADCAST = "decomposition_broadcast"
GRADIENT_BROADCAST = "gradient_broadcast"
#: The byte-accounting categories of the three exchanges of a step, in the order a step runs them.
CATEGORIES = (FACTOR_REDUCE, DECOMPOSITION_BROADCAST, GRADIENT_BROADCAST)


def factor_fields(shape: LayerShape) -> list[Field]:
    """The factors A and G of a layer (a diagonal A is not symmetric: it travels as its diagonal)."""
    return [("A", shape.a_shape(), not shape.a_diagonal), ("G", shape.g_shape(), True)]


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


def decomposition_entries(
    plan: Plan, shapes: Sequence[LayerShape], method: ComputeMethod, layers: Collection[str] | None = None
) -> list[FusionEntry]:
    """The decomposition broadcast: keys ``"<layer>/<field>"`` (the method's :meth:`~ComputeMethod.fields`).

    ``layers``: the layers decomposed on the step (default: all; see :mod:`kfac_dist.schedule`).
    """
    entries = []
    for shape in _in_plan_order(plan, shapes):
        layer = plan.layer(shape.name)
        if len(layer.grad_workers) > 1 and (layers is None or shape.name in layers):
            target = Target(CollectiveOp.BROADCAST, layer.grad_workers, root=layer.owner)
            fields = method.fields(shape)
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
