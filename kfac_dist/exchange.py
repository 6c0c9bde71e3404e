"""The three exchanges of a distributed K-FAC step, laid out once from the :class:`~kfac_dist.placement.Plan`.

1. factor reduction (factor steps): every rank's normalised batch factors of every layer are averaged into the
   layer's owner (``factor_comm="owner"``, a fused reduce per owner) or into every rank (``"allreduce"``,
   KAISA's scheme). Entries are laid out in reverse registration order, the order backward finishes layers in,
   so a bucket is launched from a backward hook as soon as its last layer is ready.
2. decomposition broadcast (inverse steps): each owner broadcasts its layers' decompositions inside their
   grad-worker groups (only when a layer has more than one grad worker).
3. gradient broadcast (every step): each grad worker broadcasts the preconditioned gradients it computed to the
   ranks the plan assigns it (only when a layer has fewer grad workers than ranks).

What each exchange sends, in which order, is :mod:`kfac_dist.entries` (shared with the closed form of
:mod:`kfac_dist.costs`). Every collective is fused (``bucket_cap_mb``) and symmetric tensors travel as upper
triangles (``symmetric_comm``). This module moves tensors; it does no K-FAC math and knows no module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from kfac_dist.comm import CollectiveOp, Communicator, FusionEntry, FusionPlan, FusionStep, Target
from kfac_dist.entries import (
    DECOMPOSITION_BROADCAST,
    FACTOR_REDUCE,
    GRADIENT_BROADCAST,
    decomposition_entries,
    factor_entries,
    factor_fields,
    gradient_entries,
)
from kfac_dist.methods import Decomposition, Field, get_method
from kfac_dist.options import KFACOptions
from kfac_dist.placement import LayerShape, Plan

STATE_GATHER = "state_gather"


@dataclass(frozen=True)
class TensorFormat:
    """The dtypes on the wire and the device of every tensor the exchange sends and returns."""

    factor_dtype: torch.dtype
    inv_dtype: torch.dtype
    grad_dtype: torch.dtype
    device: torch.device


class Exchange:
    """Fused, plan-driven communication of one rank.

    Args:
        plan: the placement every rank holds.
        shapes: the layers' shapes, in registration order.
        comm: the communicator (its groups must include ``plan.groups()``).
        options: K-FAC's options (``factor_comm``, ``symmetric_comm``, ``bucket_cap_mb``, ``compute_method``).
        tensors: dtypes and device (:class:`TensorFormat`).

    Attributes:
        factor_buffer_bytes: bytes of this rank's fusion buckets of the last factor reduction (0 before the
            first): the K-FAC buffer memory of a factor step.
    """

    def __init__(
        self,
        plan: Plan,
        shapes: Sequence[LayerShape],
        comm: Communicator,
        options: KFACOptions,
        tensors: TensorFormat,
    ) -> None:
        self.plan = plan
        self.comm = comm
        self.options = options
        self.tensors = tensors
        self.method = get_method(options.compute_method)
        self._shapes = {s.name: s for s in shapes}
        factor_dtype, inv_dtype = tensors.factor_dtype, tensors.inv_dtype
        self._factor_plan = self._fusion(factor_entries(plan, shapes, options.factor_comm), factor_dtype)
        self._shape_list = list(shapes)
        self._decomposition_plans: dict[tuple[str, ...], FusionPlan] = {}
        gradients = gradient_entries(plan, shapes, {s.name: s.grad_shape() for s in shapes})
        self._gradient_plan = self._fusion(gradients, tensors.grad_dtype)
        self._state_plan = self._gather_plan(shapes, factor_fields, factor_dtype)
        self._decomposition_state_plan = self._gather_plan(shapes, self.method.fields, inv_dtype)
        self._factor_step: FusionStep | None = None
        self.factor_buffer_bytes = 0

    # ------------------------------------------------------------------------------------------- layouts
    def _gather_plan(
        self, shapes: Sequence[LayerShape], fields: Callable[[LayerShape], list[Field]], dtype: torch.dtype
    ) -> FusionPlan:
        """A state gather: every field of every layer, allreduced (summed) over the world."""
        target = Target(CollectiveOp.ALLREDUCE, self.comm.world)
        entries = [
            FusionEntry(f"{shape.name}/{field}", tensor_shape, target, symmetric=symmetric)
            for shape in shapes
            for field, tensor_shape, symmetric in fields(shape)
        ]
        return self._fusion(entries, dtype)

    def _fusion(self, entries: list[FusionEntry], dtype: torch.dtype) -> FusionPlan:
        return FusionPlan.build(
            entries,
            bucket_cap_mb=self.options.bucket_cap_mb,
            dtype=dtype,
            symmetric_comm=self.options.symmetric_comm,
        )

    def _step(self, plan: FusionPlan, category: str) -> FusionStep:
        return FusionStep(plan, self.comm, category=category, device=self.tensors.device)

    # ------------------------------------------------------------------------------------------- factors
    def keeps_factors(self, name: str) -> bool:
        """Whether this rank keeps the running factors of ``name``."""
        return self.options.factor_comm == "allreduce" or self.plan.layer(name).owner == self.comm.rank

    def add_factors(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """Hand over one layer's final batch factors of this factor step (launches ready buckets)."""
        if self._factor_step is None:
            self._factor_step = self._step(self._factor_plan, FACTOR_REDUCE)
        self._factor_step.add(f"{name}/A", a)
        self._factor_step.add(f"{name}/G", g)

    def reduce_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Finish the factor reduction; the averaged batch factors of the layers this rank keeps."""
        step = self._factor_step or self._step(self._factor_plan, FACTOR_REDUCE)
        self._factor_step = None
        self.factor_buffer_bytes = step.nbytes
        step.flush()
        results = step.wait()
        return {name: (results[f"{name}/A"], results[f"{name}/G"]) for name in self._shapes if self.keeps_factors(name)}

    def gather_factors(
        self, kept: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's running factors, on every rank (collective): each owner contributes its own.

        Layers whose owner has no factors yet are left out (their G arrives all zero, which a factor never is).
        """
        step = self._step(self._state_plan, STATE_GATHER)
        for name, (a, g) in kept.items():
            if self.plan.layer(name).owner == self.comm.rank:
                step.add(f"{name}/A", a)
                step.add(f"{name}/G", g)
        step.flush()
        results = step.wait()
        gathered = {name: (results[f"{name}/A"].clone(), results[f"{name}/G"].clone()) for name in self._shapes}
        return {name: (a, g) for name, (a, g) in gathered.items() if bool(g.any())}

    def gather_decompositions(self, owned: Mapping[str, Decomposition | None]) -> dict[str, dict[str, torch.Tensor]]:
        """Every layer's decomposition as ``{field: tensor}``, on every rank (collective, from the owners)."""
        step = self._step(self._decomposition_state_plan, STATE_GATHER)
        for name, decomposition in owned.items():
            if decomposition is not None and self.plan.layer(name).owner == self.comm.rank:
                self._add_decomposition(step, name, decomposition)
        step.flush()
        results = step.wait()
        gathered = {}
        for name in self._shapes:
            decomposition = self._assemble(name, results)
            if decomposition is not None:
                gathered[name] = dict(decomposition.tensors)
        return gathered

    def decomposition_from_fields(self, name: str, fields: Mapping[str, torch.Tensor]) -> Decomposition | None:
        """Rebuild a decomposition saved by :meth:`gather_decompositions`, on this run's device.

        None if it does not fit this run.
        """
        expected = self.method.fields(self._shapes[name])
        if {f for f, _, _ in expected} != set(fields) or any(
            tuple(fields[f].shape) != shape for f, shape, _ in expected
        ):
            return None
        cast = {f: fields[f].to(device=self.tensors.device, dtype=self.tensors.inv_dtype) for f, _, _ in expected}
        return self._assemble(name, {f"{name}/{f}": t for f, t in cast.items()})

    # ------------------------------------------------------------------------------------------- decompositions
    def share_decompositions(
        self, owned: Mapping[str, Decomposition | None], layers: tuple[str, ...]
    ) -> dict[str, Decomposition | None]:
        """Broadcast owners' decompositions of ``layers`` to grad workers; each of them this rank works on, by name.

        ``layers``: the layers decomposed on this step, in plan order, the same on every rank
        (:class:`~kfac_dist.schedule.DecompositionSchedule`). An owner without a decomposition sends zeros, which
        arrive as None (a valid decomposition never has an all-zero eigenbasis or inverse).
        """
        if layers not in self._decomposition_plans:
            entries = decomposition_entries(self.plan, self._shape_list, self.method, set(layers))
            self._decomposition_plans[layers] = self._fusion(entries, self.tensors.inv_dtype)
        step = self._step(self._decomposition_plans[layers], DECOMPOSITION_BROADCAST)
        for name, decomposition in owned.items():
            if decomposition is None or len(self.plan.layer(name).grad_workers) == 1:
                continue
            self._add_decomposition(step, name, decomposition)
        step.flush()
        results = step.wait()
        shared: dict[str, Decomposition | None] = {}
        due = set(layers)
        received = []
        for name in self.plan.layers_worked_by(self.comm.rank):
            if name not in due:
                continue
            if self.plan.layer(name).owner == self.comm.rank or len(self.plan.layer(name).grad_workers) == 1:
                shared[name] = owned.get(name)
            else:
                received.append(name)
        # Which arrived (one host sync for all of them); kept as views of the buckets, which the receivers' shape
        # groups copy into their stacks (kfac_dist.worklist), so nothing is copied twice.
        presence = self.method.presence_field
        flags = torch.stack([results[f"{n}/{presence}"].any() for n in received]).tolist() if received else []
        for name, present in zip(received, flags, strict=True):
            fields = self.method.fields(self._shapes[name])
            tensors = {f: results[f"{name}/{f}"] for f, _, _ in fields}
            shared[name] = Decomposition(self.method.name, tensors) if present else None
        return shared

    def _add_decomposition(self, step: FusionStep, name: str, decomposition: Decomposition) -> None:
        for field, _, _ in self.method.fields(self._shapes[name]):
            step.add(f"{name}/{field}", decomposition.tensors[field])

    def _assemble(self, name: str, results: Mapping[str, torch.Tensor]) -> Decomposition | None:
        """The decomposition of ``name`` among ``results`` (keys ``"<layer>/<field>"``), or None if none was sent."""
        fields = self.method.fields(self._shapes[name])
        return self.method.assemble(self._shapes[name], {f: results[f"{name}/{f}"].clone() for f, _, _ in fields})

    # ------------------------------------------------------------------------------------------- gradients
    def share_gradients(self, computed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Broadcast preconditioned gradients from grad workers; those this rank received, by layer name.

        A worker that has no preconditioned gradient for a layer sends zeros (see ``KFACPreconditioner``).
        """
        step = self._step(self._gradient_plan, GRADIENT_BROADCAST)
        for name, matrix in computed.items():
            for src, _ in self.plan.layer(name).grad_broadcasts:
                if src == self.comm.rank:
                    step.add(f"{name}@{src}", matrix)
        step.flush()
        results = step.wait()
        received = {}
        for name in self._shapes:
            for src, receivers in self.plan.layer(name).grad_broadcasts:
                if self.comm.rank in receivers:
                    received[name] = results[f"{name}@{src}"].clone()
        return received
