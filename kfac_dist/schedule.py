"""Which layers are decomposed at which step: all at once every ``inv_update_steps`` steps, or staggered.

Without ``inv_stagger`` every layer is decomposed on steps k with ``k % inv_update_steps == 0``: the step that
does it carries every decomposition of the period. With ``inv_stagger`` each layer gets a phase in
``[0, inv_update_steps)`` and is decomposed on steps k with ``k % inv_update_steps == phase`` (every layer on step
0, so the first step has all of them), so each step carries about ``1 / inv_update_steps`` of the work. The phases
balance each rank's own decompositions (the layers it owns), by the method's
:meth:`~kfac_dist.methods.ComputeMethod.decomposition_flops`: longest first, each to the phase with the least work
so far (Graham's LPT rule: no phase exceeds the mean by more than the largest layer). Every rank computes the same
phases from the plan, so the decomposition broadcasts of a step match on every rank.

The preconditioner and the closed-form costs (:mod:`kfac_dist.costs`) both read :meth:`DecompositionSchedule.due`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kfac_dist.methods import get_method
from kfac_dist.options import KFACOptions
from kfac_dist.placement import LayerShape, Plan


def decomposition_phases(plan: Plan, shapes: Sequence[LayerShape], period: int, method: str) -> dict[str, int]:
    """Each layer's phase in ``[0, period)``, balancing every owner's decomposition work over the phases."""
    cost = {s.name: get_method(method).decomposition_flops(s) for s in shapes}
    phases: dict[str, int] = {}
    for rank in range(plan.world_size):
        load = [0.0] * period
        owned = plan.layers_owned_by(rank)
        for name in sorted(owned, key=lambda n: (-cost[n], owned.index(n))):
            phase = min(range(period), key=lambda p: (load[p], p))
            phases[name] = phase
            load[phase] += cost[name]
    return phases


class DecompositionSchedule:
    """The layers decomposed at each step under ``options`` (see the module docstring)."""

    def __init__(self, plan: Plan, shapes: Sequence[LayerShape], options: KFACOptions) -> None:
        self.options = options
        self.names = tuple(lp.name for lp in plan.layers)
        self.phases: dict[str, int] | None = None
        if options.inv_stagger:  # KFACOptions refuses it with a callable inv_update_steps
            period = int(options.value("inv_update_steps", 0))
            self.phases = decomposition_phases(plan, shapes, period, options.compute_method)

    def due(self, step: int) -> tuple[str, ...]:
        """The layers decomposed at ``step``, in plan order (empty on a step without decompositions)."""
        period = int(self.options.value("inv_update_steps", step))
        if self.phases is None or step == 0:
            return self.names if step % period == 0 else ()
        return tuple(name for name in self.names if self.phases[name] == step % period)
