"""``compute_method="eigen_warm"``: eigenbases warm-started from the previous decomposition; eigh only on drift.

Per factor F (A and G apart) and per block, starting from the previous eigenbasis Q (columns ordered by their
previous eigenvalues, largest first):

1. :data:`WARM_ITERATIONS` orthogonal iterations ``Q <- qr(F Q)``, each column's sign fixed so that ``diag(R) >= 0``
   (columns do not flip);
2. Rayleigh-Ritz-lite: ``B = Q^T F Q``, eigenvalues ``diag(B)`` clamped at 0 (paired with Q's columns; their order
   does not matter for preconditioning);
3. the block's drift :func:`basis_drift` ``= ||offdiag(B)||_F / ||B||_F``; a block whose drift is above
   :data:`WARM_TOLERANCE` (or whose result is not finite) gets a full eigh instead, computed for those blocks alone,
   and is counted in ``events["eigenbasis_refreshed"]``.

What the warm result guarantees: it is the exact eigendecomposition of ``F~ = Q diag(B) Q^T``, and
``||F - F~||_F = drift ||F||_F <= WARM_TOLERANCE ||F||_F`` (Q is orthogonal). Hence (Weyl, Hoffman-Wielandt) its
eigenvalues are within ``drift ||F||_F`` of eigh's (sorted), and the damped Kronecker inverse it applies satisfies
``||P~ v - P v|| <= (drift_A ||A||_F ||G||_2 + drift_G ||A||_2 ||G||_F) / d * ||P v||`` for ``P = (A (x) G + d I)^-1``
(since ``P~ - P = P~ (A (x) G - A~ (x) G~) P``, ``||P~|| <= 1/d`` and ``||A~||_2 <= ||A||_2``).

Every decision and result is per block (the blocks of a stack never mix), so a stack decomposes as its blocks do
alone. Without a usable previous decomposition (none, another method's, other shapes) a factor is decomposed by a
full eigh exactly as ``compute_method="eigen"`` does.
"""

from __future__ import annotations

import torch

from kfac_dist import curvature
from kfac_dist.methods.base import Decomposition
from kfac_dist.methods.eigen import EigenMethod
from kfac_dist.placement import LayerShape

#: Orthogonal iterations per warm decomposition.
WARM_ITERATIONS = 1
#: The largest drift ``||offdiag(Q^T F Q)||_F / ||Q^T F Q||_F`` a warm-started block keeps; above it, a full eigh.
#: Chosen by the measurement in docs/conventions.md ("Warm-started eigenbases"); it also bounds the warm eigenvalues'
#: error at 5% of ``||F||_F``.
WARM_TOLERANCE = 0.05
#: Floating-point operations of a Householder QR with its Q formed, per n^3 (geqrf 4/3 + orgqr 4/3).
QR_FLOPS_PER_N3 = 8.0 / 3.0
#: The health counter of blocks refreshed by a full eigh (:data:`kfac_dist.report.HEALTH_COUNTERS`).
REFRESHED = "eigenbasis_refreshed"


def basis_drift(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``||offdiag(Q^T F Q)||_F / ||Q^T F Q||_F`` per block: how far the columns of Q are from eigenvectors of F."""
    return _offdiagonal_ratio(vectors.mT @ matrix @ vectors)


def _offdiagonal_ratio(rayleigh: torch.Tensor) -> torch.Tensor:
    """The drift of a Rayleigh quotient matrix B per block; 0 for B = 0, NaN when B is not finite."""
    diagonal = torch.diag_embed(torch.diagonal(rayleigh, dim1=-2, dim2=-1))
    total = torch.linalg.matrix_norm(rayleigh)
    return torch.linalg.matrix_norm(rayleigh - diagonal) / total.clamp_min(torch.finfo(rayleigh.dtype).tiny)


def warm_eigh(
    matrix: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Eigenvalues, eigenvectors of ``matrix`` warm-started from ``values``, ``vectors``, and the blocks refreshed.

    Raises:
        kfac_dist.curvature.DecompositionError: if a block needs a full eigh and it fails.
    """
    f = matrix.to(dtype)
    order = torch.argsort(values.to(dtype), dim=-1, descending=True, stable=True)
    q = torch.gather(vectors.to(dtype), -1, order.unsqueeze(-2).expand(vectors.shape))
    for _ in range(WARM_ITERATIONS):
        q, r = torch.linalg.qr(f @ q)
        q = q * (1 - 2 * (torch.diagonal(r, dim1=-2, dim2=-1) < 0).to(dtype)).unsqueeze(-2)
    rayleigh = q.mT @ (f @ q)
    warm_values = torch.diagonal(rayleigh, dim1=-2, dim2=-1).clamp(min=0.0)
    # ~(drift <= tolerance): a NaN drift (a non-finite block) is refreshed too, where eigh raises for it.
    stale = ~(_offdiagonal_ratio(rayleigh) <= WARM_TOLERANCE) | ~torch.isfinite(q).all(dim=-1).all(dim=-1)
    index = stale.nonzero().squeeze(-1)
    if index.numel() == 0:
        return warm_values, q, 0
    fresh_values, fresh_vectors = curvature.symmetric_eigh(f.index_select(0, index), dtype)
    return warm_values.index_copy(0, index, fresh_values), q.index_copy(0, index, fresh_vectors), index.numel()


class WarmEigenMethod(EigenMethod):
    """:class:`EigenMethod`'s fields and preconditioning, its eigenbases warm-started (see the module docstring)."""

    name = "eigen_warm"
    warm_starts = True

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
        """Warm-started eigenvalues (clamped at 0) and eigenvectors of A and G; a diagonal A is its own eigenvalues.

        ``events["eigenbasis_refreshed"]``: the factor blocks (A and G apart) that drifted past
        :data:`WARM_TOLERANCE` and were decomposed by a full eigh.
        """
        last = previous.tensors if previous is not None and previous.method == self.name else {}
        l_g, q_g, refreshed = self._factor(g, last.get("l_g"), last.get("q_g"), dtype)
        if a_diagonal:
            tensors = {"l_a": a.to(dtype).clamp(min=0.0), "q_g": q_g, "l_g": l_g}
            return Decomposition(self.name, tensors, {REFRESHED: refreshed})
        l_a, q_a, refreshed_a = self._factor(a, last.get("l_a"), last.get("q_a"), dtype)
        tensors = {"q_a": q_a, "l_a": l_a, "q_g": q_g, "l_g": l_g}
        return Decomposition(self.name, tensors, {REFRESHED: refreshed + refreshed_a})

    @staticmethod
    def _factor(
        matrix: torch.Tensor, values: torch.Tensor | None, vectors: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One factor: warm-started from a previous eigenbasis of its shape, else a full eigh (not a refresh)."""
        if values is None or vectors is None or vectors.shape != matrix.shape or values.shape != matrix.shape[:-1]:
            full_values, full_vectors = curvature.symmetric_eigh(matrix, dtype)
            return full_values, full_vectors, 0
        return warm_eigh(matrix, values, vectors, dtype)

    def decomposition_flops(self, shape: LayerShape) -> float:
        """The warm cost, ``(WARM_ITERATIONS (2 + q) + 4) n^3`` per factor block, ``q`` = :data:`QR_FLOPS_PER_N3`.

        Each iteration is a GEMM ``F Q`` and a QR; the Rayleigh quotient is two GEMMs. A refreshed block adds an
        eigh's :data:`~kfac_dist.methods.eigen.EIGH_FLOPS_PER_N3`, not counted here (how many are refreshed:
        docs/conventions.md, "Warm-started eigenbases"). The count is close to eigh's; the gain is in the rate: GEMMs
        run near a GPU's peak, eigh far below it (issue 13: 5.7 ms at n = 576 on an H200); QR's rate is unmeasured.
        """
        per_n3 = WARM_ITERATIONS * (2.0 + QR_FLOPS_PER_N3) + 4.0
        a_cube = 0.0 if shape.a_diagonal else float(shape.a_side) ** 3
        return per_n3 * (a_cube + float(shape.g_side) ** 3) * shape.blocks
