"""``compute_method="eigen"``: eigendecompositions of A and G, the exact damped Kronecker inverse."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kfac_dist import curvature
from kfac_dist.methods.base import ComputeMethod, Decomposition, Field
from kfac_dist.placement import LayerShape
from kfac_dist.precision import bmm, operand_dtype

#: Floating-point operations of a symmetric eigendecomposition with eigenvectors, per n^3 (Golub & Van Loan's ~9).
EIGH_FLOPS_PER_N3 = 9.0


class EigenMethod(ComputeMethod):
    """``(A (x) G + d I)^-1 vec(M)`` through the eigenbases: ``Q_G [(Q_G^T M Q_A) / (l_G l_A^T + d)] Q_A^T``.

    Fields: Q_A (none for a diagonal A), l_A, Q_G, l_G; eigenbases are not symmetric, so nothing is packed.
    """

    name = "eigen"
    presence_field = "q_g"

    def fields(self, shape: LayerShape) -> list[Field]:
        """Q_A (not for a diagonal A), l_A, Q_G, l_G."""
        b, n, m = shape.blocks, shape.a_side, shape.g_side
        q_a: list[Field] = [] if shape.a_diagonal else [("q_a", (b, n, n), False)]
        return [*q_a, ("l_a", (b, n), False), ("q_g", (b, m, m), False), ("l_g", (b, m), False)]

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
        """Eigenvalues (clamped at 0) and eigenvectors of A and G; a diagonal A is its own eigenvalues."""
        l_g, q_g = curvature.symmetric_eigh(g, dtype)
        if a_diagonal:
            return Decomposition(self.name, {"l_a": a.to(dtype).clamp(min=0.0), "q_g": q_g, "l_g": l_g})
        l_a, q_a = curvature.symmetric_eigh(a, dtype)
        return Decomposition(self.name, {"q_a": q_a, "l_a": l_a, "q_g": q_g, "l_g": l_g})

    def terms(
        self, decomposition: Decomposition, damping: float, precision: str = "highest"
    ) -> dict[str, torch.Tensor]:
        """The eigenbases, their transposes (views) and the denominator ``l_G l_A^T + d`` (in the dtype)."""
        t = decomposition.tensors
        low = operand_dtype(precision, decomposition.dtype)
        q_g = t["q_g"].to(low)
        terms = {"q_g": q_g, "q_g_t": q_g.mT}
        if "q_a" in t:
            q_a = t["q_a"].to(low)
            terms |= {"q_a": q_a, "q_a_t": q_a.mT}
        terms["denominator"] = t["l_g"].unsqueeze(2) * t["l_a"].unsqueeze(1) + damping
        return terms

    def apply(self, terms: Mapping[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """Rotate into the eigenbases, divide by the denominator, rotate back."""
        q_a = terms.get("q_a")
        rotated = bmm(terms["q_g_t"], grad.to(terms["denominator"].dtype))
        if q_a is not None:
            rotated = bmm(rotated, q_a)
        result = bmm(terms["q_g"], rotated / terms["denominator"])
        return result if q_a is None else bmm(result, terms["q_a_t"])

    def decomposition_flops(self, shape: LayerShape) -> float:
        """``c (a^3 + g^3)`` per block, ``c`` = :data:`EIGH_FLOPS_PER_N3` (a diagonal A costs nothing)."""
        a_cube = 0.0 if shape.a_diagonal else float(shape.a_side) ** 3
        return EIGH_FLOPS_PER_N3 * (a_cube + float(shape.g_side) ** 3) * shape.blocks

    def precondition_flops(self, shape: LayerShape) -> float:
        """Four GEMMs per block, ``4 a g (a + g)`` (rotate in, rotate out)."""
        a, g = shape.a_side, shape.g_side
        return 4.0 * a * g * (a + g) * shape.blocks
