"""``compute_method="inverse"``: damped inverses of A and G with factored Tikhonov damping (Martens & Grosse's pi)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kfac_dist import curvature
from kfac_dist.methods.base import ComputeMethod, Decomposition, Field
from kfac_dist.placement import LayerShape
from kfac_dist.precision import bmm, operand_dtype, widened


class InverseMethod(ComputeMethod):
    """``G_d^-1 M A_d^-1`` with ``A_d = A + pi sqrt(d) I`` and ``G_d = G + sqrt(d) / pi I``.

    Fields: A^-1 (a diagonal A: its diagonal, not symmetric), G^-1; both symmetric, so they travel packed.
    """

    name = "inverse"
    presence_field = "g_inv"

    def fields(self, shape: LayerShape) -> list[Field]:
        """A^-1 and G^-1."""
        return [("a_inv", shape.a_shape(), not shape.a_diagonal), ("g_inv", shape.g_shape(), True)]

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
        """``(A + pi sqrt(d) I)^-1`` and ``(G + sqrt(d) / pi I)^-1`` by Cholesky."""
        pi = curvature.pi_correction(a, g, a_diagonal).to(dtype)
        root = damping**0.5
        g_inv = curvature.spd_inverse(g, root / pi, dtype)
        if a_diagonal:
            a_inv = 1.0 / (a.to(dtype) + (pi * root).unsqueeze(-1))
            if not curvature.is_finite(a_inv):
                raise curvature.DecompositionError("the diagonal inverse has non-finite values")
        else:
            a_inv = curvature.spd_inverse(a, pi * root, dtype)
        return Decomposition(self.name, {"a_inv": a_inv, "g_inv": g_inv})

    def terms(
        self, decomposition: Decomposition, damping: float, precision: str = "highest"
    ) -> dict[str, torch.Tensor]:
        """A^-1 and G^-1 (the damping is already in them; a diagonal A^-1 stays in the dtype)."""
        low = operand_dtype(precision, decomposition.dtype)
        a_inv, g_inv = decomposition.tensors["a_inv"], decomposition.tensors["g_inv"]
        return {"a_inv": a_inv if a_inv.dim() == 2 else a_inv.to(low), "g_inv": g_inv.to(low)}

    def apply(self, terms: Mapping[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """``G^-1 M A^-1``."""
        a_inv, g_inv = terms["a_inv"], terms["g_inv"]
        matrix = grad.to(widened(g_inv.dtype))
        if a_inv.dim() == 2:  # diagonal A
            return bmm(g_inv, matrix * a_inv.unsqueeze(1))
        return bmm(bmm(g_inv, matrix), a_inv)

    def decomposition_flops(self, shape: LayerShape) -> float:
        """``a^3 + g^3`` per block (Cholesky n^3/3 and ``cholesky_inverse`` 2 n^3/3; a diagonal A costs nothing)."""
        a_cube = 0.0 if shape.a_diagonal else float(shape.a_side) ** 3
        return (a_cube + float(shape.g_side) ** 3) * shape.blocks

    def precondition_flops(self, shape: LayerShape) -> float:
        """Two GEMMs per block, ``2 a g (a + g)``."""
        a, g = shape.a_side, shape.g_side
        return 2.0 * a * g * (a + g) * shape.blocks
