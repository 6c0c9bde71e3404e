"""This rank's K-FAC work, grouped by shape, so each phase runs once per shape group rather than once per layer.

Layers whose factors, gradient matrices and parameters have the same shapes (and the same layer type) form a
:class:`ShapeGroup`. Their decompositions are computed as one batched call on the stack of their factors and kept
stacked: each layer's :class:`~kfac_dist.methods.Decomposition` is a view of the group's stack, so memory is what
it was per layer. Preconditioning multiplies the stacked gradients of the whole group by the method's terms
(:meth:`ComputeMethod.terms`, kept until the decomposition or the damping changes) with a few ``torch.bmm`` calls,
and the gradients are read and written as one stacked tensor (:mod:`kfac_dist.layers.batched`).

Every result of a block depends on that block alone (batched matmul, eigh and Cholesky treat each matrix on its
own), so a distributed run, whose ranks stack different layers together, equals the one-process run: to the last
bit for the products, to rounding where a library's kernel depends on where a block sits in memory (MKL's eigh
and QR at odd sizes give a block other last bits at other offsets of a stack).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from kfac_dist.methods import ComputeMethod, Decomposition
from kfac_dist.registry import LayerState


def group_key(state: LayerState) -> tuple[object, ...]:
    """What layers must share to be stacked: type, factor sides, blocks, diagonal A and parameter shapes."""
    layer = state.layer
    shapes = tuple(tuple(p.shape) for p in layer.parameters())
    return (type(layer), layer.a_side, layer.g_side, layer.blocks, layer.a_diagonal, shapes)


def stack_decompositions(method: ComputeMethod, parts: Sequence[Decomposition]) -> Decomposition:
    """One decomposition whose fields are the parts' fields concatenated along blocks."""
    fields = parts[0].tensors
    return Decomposition(method.name, {f: torch.cat([p.tensors[f] for p in parts]) for f in fields})


def split_decomposition(stacked: Decomposition, blocks: int) -> list[Decomposition]:
    """Per-layer views of a stacked decomposition of layers with ``blocks`` blocks each."""
    names = list(stacked.tensors)
    pieces = [stacked.tensors[f].split(blocks) for f in names]
    return [Decomposition(stacked.method, dict(zip(names, row, strict=True))) for row in zip(*pieces, strict=True)]


class ShapeGroup:
    """Layers of one shape on this rank, in registration order, and their stacked decomposition and terms."""

    def __init__(self, states: list[LayerState]) -> None:
        self.states = states
        self.blocks = states[0].layer.blocks
        self._parts: list[Decomposition] = []
        self._stacked: Decomposition | None = None
        self._terms: tuple[float, dict[str, torch.Tensor]] | None = None

    def adopt(self, members: Sequence[LayerState], stacked: Decomposition) -> None:
        """Give ``members`` their views of a decomposition computed for all of them at once."""
        parts = split_decomposition(stacked, self.blocks)
        for state, part in zip(members, parts, strict=True):
            state.decomposition = part
        self._parts, self._stacked, self._terms = parts, stacked, None

    def stacked(self, method: ComputeMethod, members: Sequence[LayerState]) -> Decomposition:
        """The members' decompositions as one stack: the kept one while they are unchanged, else stacked anew.

        Stacking anew (decompositions received from other ranks or loaded) moves the members onto views of the new
        stack, so no layer's decomposition is held twice.
        """
        current = [state.decomposition for state in members]
        if (
            self._stacked is None
            or len(current) != len(self._parts)
            or any(c is not p for c, p in zip(current, self._parts, strict=False))
        ):
            parts = [c for c in current if c is not None]
            assert len(parts) == len(members), "every member has a decomposition"
            self.adopt(members, stack_decompositions(method, parts))
        assert self._stacked is not None
        return self._stacked

    def terms(
        self, method: ComputeMethod, members: Sequence[LayerState], damping: float, precision: str
    ) -> dict[str, torch.Tensor]:
        """The method's terms of the members' stacked decomposition at ``damping`` and ``precision``.

        Kept while the decomposition and the damping are unchanged.
        """
        stacked = self.stacked(method, members)
        if self._terms is None or self._terms[0] != damping:
            self._terms = (damping, method.terms(stacked, damping, precision))
        return self._terms[1]


def build_groups(states: Iterable[LayerState]) -> list[ShapeGroup]:
    """The shape groups of ``states``, in the order each shape first appears."""
    grouped: dict[tuple[object, ...], list[LayerState]] = {}
    for state in states:
        grouped.setdefault(group_key(state), []).append(state)
    return [ShapeGroup(members) for members in grouped.values()]
