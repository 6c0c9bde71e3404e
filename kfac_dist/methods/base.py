"""What a compute method is: how it decomposes a layer's factors, preconditions a gradient, and what it sends.

A method is one :class:`ComputeMethod` subclass and one row of :data:`kfac_dist.methods.METHODS`. Everything
that depends on the method asks it: the exchange (which tensors a decomposition is made of, their shapes and
which are symmetric: :meth:`ComputeMethod.fields`), the closed-form costs (their sizes, from the same fields),
the health ladder (:meth:`ComputeMethod.decompose`), the step (:meth:`ComputeMethod.precondition`) and the cost
model of the benchmarks and placement (:meth:`ComputeMethod.decomposition_flops`,
:meth:`ComputeMethod.precondition_flops`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from kfac_dist.comm.layout import packed_numel
from kfac_dist.placement import LayerShape

Field = tuple[str, tuple[int, ...], bool]
"""``(field name, shape, symmetric)`` of one tensor of a layer."""


@dataclass(frozen=True)
class Decomposition:
    """A layer's decomposition: its method's tensors by field name, in the order of :meth:`ComputeMethod.fields`."""

    method: str
    tensors: dict[str, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its tensors share."""
        return next(iter(self.tensors.values())).dtype

    def cast(self, dtype: torch.dtype) -> Decomposition:
        """The same decomposition with every tensor cast to ``dtype``."""
        return Decomposition(self.method, {name: t.to(dtype) for name, t in self.tensors.items()})

    def nbytes(self) -> int:
        """Bytes of its tensors."""
        return sum(t.nbytes for t in self.tensors.values())


def wire_numel(field_shape: tuple[int, ...], symmetric: bool, pack: bool) -> int:
    """Elements of one field on the wire: the upper triangles of a symmetric ``(b, n, n)`` field when packing."""
    if symmetric and pack:
        return packed_numel(field_shape[-1], field_shape[0])
    return math.prod(field_shape)


class ComputeMethod(ABC):
    """How one compute method turns a layer's factors A, G into a preconditioner (see the module docstring)."""

    #: The method's name: its key in :data:`kfac_dist.methods.METHODS` and the ``compute_method`` option's value.
    name: ClassVar[str]
    #: A field that is never all zero in a valid decomposition: an owner without one sends zeros (see
    #: :meth:`assemble`).
    presence_field: ClassVar[str]

    @abstractmethod
    def fields(self, shape: LayerShape) -> list[Field]:
        """The tensors of a layer's decomposition, in a fixed order (the order they travel in)."""

    @abstractmethod
    def decompose(
        self, a: torch.Tensor, g: torch.Tensor, *, a_diagonal: bool, damping: float, dtype: torch.dtype
    ) -> Decomposition:
        """Decompose the running factors A, G in ``dtype``.

        Raises:
            kfac_dist.curvature.DecompositionError: if they cannot be decomposed.
        """

    @abstractmethod
    def precondition(self, decomposition: Decomposition, grad: torch.Tensor, damping: float) -> torch.Tensor:
        """The preconditioned gradient matrix ``(b, m, n)``, in the decomposition's dtype."""

    @abstractmethod
    def decomposition_flops(self, shape: LayerShape) -> float:
        """Floating-point operations of one decomposition of the layer (all its blocks)."""

    @abstractmethod
    def precondition_flops(self, shape: LayerShape) -> float:
        """Floating-point operations of preconditioning the layer's gradient once (all its blocks)."""

    def comm_numel(self, shape: LayerShape, *, symmetric_comm: bool) -> int:
        """Elements of the decomposition the owner sends each fellow grad worker."""
        return sum(wire_numel(s, sym, symmetric_comm) for _, s, sym in self.fields(shape))

    def storage_numel(self, shape: LayerShape) -> int:
        """Elements of the decomposition a grad worker stores (full square)."""
        return self.comm_numel(shape, symmetric_comm=False)

    def assemble(self, shape: LayerShape, tensors: Mapping[str, torch.Tensor]) -> Decomposition | None:
        """The decomposition made of ``tensors`` (by field name), or None if it arrived all zero (none was sent)."""
        if not bool(tensors[self.presence_field].any()):
            return None
        return Decomposition(self.name, {name: tensors[name] for name, _, _ in self.fields(shape)})
