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
from dataclasses import dataclass, field
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
    #: Health events of making it, as counts of blocks by :data:`kfac_dist.report.HEALTH_COUNTERS` name (e.g. a
    #: warm-started method's full refreshes); the preconditioner adds them to ``health()``.
    events: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its tensors share."""
        return next(iter(self.tensors.values())).dtype

    def cast(self, dtype: torch.dtype) -> Decomposition:
        """The same decomposition with every tensor cast to ``dtype``."""
        return Decomposition(self.method, {name: t.to(dtype) for name, t in self.tensors.items()}, self.events)

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
    #: Whether :meth:`decompose` starts from the ``previous`` decomposition (the step then passes it).
    warm_starts: ClassVar[bool] = False

    @abstractmethod
    def fields(self, shape: LayerShape) -> list[Field]:
        """The tensors of a layer's decomposition, in a fixed order (the order they travel in)."""

    @abstractmethod
    def decompose(
        self,
        a: torch.Tensor,
        g: torch.Tensor,
        *,
        a_diagonal: bool,
        damping: float,
        dtype: torch.dtype,
        previous: Decomposition | None = None,
    ) -> Decomposition:
        """Decompose the running factors A, G in ``dtype``.

        ``previous``: the last decomposition of the same blocks (in the same order), for methods that warm-start
        from it; None when there is none. Each block's result depends on that block alone, never on the others
        stacked with it, up to rounding (distributed and single-process runs stack different layers together; see
        :mod:`kfac_dist.worklist`).

        Raises:
            kfac_dist.curvature.DecompositionError: if they cannot be decomposed.
        """

    @abstractmethod
    def terms(
        self, decomposition: Decomposition, damping: float, precision: str = "highest"
    ) -> dict[str, torch.Tensor]:
        """What :meth:`apply` multiplies by, prepared once per decomposition and damping (views where possible).

        A step that preconditions many times with one decomposition (every step between two inverse steps) keeps
        them, so :meth:`apply` is only the multiplications. ``precision`` (:mod:`kfac_dist.precision`): at
        ``"bf16"`` the matrices are kept in bfloat16 (``operand_dtype``) and :meth:`apply` multiplies with
        :func:`kfac_dist.precision.bmm`.
        """

    @abstractmethod
    def apply(self, terms: Mapping[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """The preconditioned gradient matrix ``(b, m, n)`` of ``grad`` (any number of stacked blocks).

        In the decomposition's dtype; batched matrix products only (one :func:`kfac_dist.precision.bmm` each).
        """

    def precondition(
        self, decomposition: Decomposition, grad: torch.Tensor, damping: float, precision: str = "highest"
    ) -> torch.Tensor:
        """The preconditioned gradient matrix ``(b, m, n)``, in the decomposition's dtype."""
        return self.apply(self.terms(decomposition, damping, precision), grad)

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
