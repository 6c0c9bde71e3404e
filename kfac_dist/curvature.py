"""How factors are averaged, decomposed, damped and applied. No ranks, groups or bytes here.

Shapes follow :mod:`kfac_dist.layers.base`: A is ``(b, n, n)`` or, when diagonal, ``(b, n)``; G is ``(b, m, m)``;
a gradient matrix is ``(b, m, n)``. See docs/conventions.md for the formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class DecompositionError(RuntimeError):
    """A factor could not be decomposed, even in float64."""


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite (one host sync)."""
    return bool(torch.isfinite(tensor).all())


def running_average(current: torch.Tensor | None, batch: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay * current + (1 - decay) * batch``; the first update takes ``batch`` as it is."""
    if current is None:
        return batch.clone()
    return current.mul(decay).add_(batch, alpha=1.0 - decay)


@dataclass
class EigenDecomposition:
    """Eigenbases and eigenvalues of A and G (``q_a`` is None for a diagonal A)."""

    q_a: torch.Tensor | None
    l_a: torch.Tensor
    q_g: torch.Tensor
    l_g: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that make up this decomposition, in a fixed order."""
        return [t for t in (self.q_a, self.l_a, self.q_g, self.l_g) if t is not None]


@dataclass
class InverseDecomposition:
    """Damped inverses of A (diagonal for a diagonal A) and G."""

    a_inv: torch.Tensor
    g_inv: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that make up this decomposition, in a fixed order."""
        return [self.a_inv, self.g_inv]


Decomposition = EigenDecomposition | InverseDecomposition


def _symmetric_eigh(matrix: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: factors are PSD) and eigenvectors, or raise DecompositionError."""
    try:
        values, vectors = torch.linalg.eigh(matrix.to(dtype))
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        raise DecompositionError(str(error)) from error
    if not (is_finite(values) and is_finite(vectors)):
        raise DecompositionError("eigh returned non-finite values")
    return values.clamp_(min=0.0), vectors


def eigen_decomposition(a: torch.Tensor, g: torch.Tensor, a_diagonal: bool, dtype: torch.dtype) -> EigenDecomposition:
    """Eigendecompositions of A and G in ``dtype``."""
    l_g, q_g = _symmetric_eigh(g, dtype)
    if a_diagonal:
        return EigenDecomposition(q_a=None, l_a=a.to(dtype).clamp(min=0.0), q_g=q_g, l_g=l_g)
    l_a, q_a = _symmetric_eigh(a, dtype)
    return EigenDecomposition(q_a=q_a, l_a=l_a, q_g=q_g, l_g=l_g)


def pi_correction(a: torch.Tensor, g: torch.Tensor, a_diagonal: bool) -> torch.Tensor:
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` per block, 1 where a trace is 0."""
    mean_a = a.mean(dim=-1) if a_diagonal else torch.diagonal(a, dim1=-2, dim2=-1).mean(dim=-1)
    mean_g = torch.diagonal(g, dim1=-2, dim2=-1).mean(dim=-1)
    valid = (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(valid, mean_a / torch.where(valid, mean_g, torch.ones_like(mean_g)), torch.ones_like(mean_a))
    return ratio.sqrt()


def _spd_inverse(matrix: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(matrix + shift I)^-1`` for a batch of SPD matrices via Cholesky, or raise DecompositionError."""
    side = matrix.shape[-1]
    eye = torch.eye(side, dtype=dtype, device=matrix.device)
    damped = matrix.to(dtype) + shift.to(dtype).reshape(-1, 1, 1) * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if bool((info != 0).any()):
        raise DecompositionError("Cholesky factorisation failed: the damped factor is not positive definite")
    inverse = torch.cholesky_inverse(factor)
    if not is_finite(inverse):
        raise DecompositionError("the inverse has non-finite values")
    return inverse


def inverse_decomposition(
    a: torch.Tensor, g: torch.Tensor, a_diagonal: bool, damping: float, dtype: torch.dtype
) -> InverseDecomposition:
    """Factored Tikhonov damping: ``(A + pi sqrt(d) I)^-1`` and ``(G + sqrt(d) / pi I)^-1``."""
    pi = pi_correction(a, g, a_diagonal).to(dtype)
    root = damping**0.5
    g_inv = _spd_inverse(g, root / pi, dtype)
    if a_diagonal:
        a_inv = 1.0 / (a.to(dtype) + (pi * root).unsqueeze(-1))
        if not is_finite(a_inv):
            raise DecompositionError("the diagonal inverse has non-finite values")
    else:
        a_inv = _spd_inverse(a, pi * root, dtype)
    return InverseDecomposition(a_inv=a_inv, g_inv=g_inv)


def decompose(
    a: torch.Tensor, g: torch.Tensor, *, a_diagonal: bool, method: str, damping: float, dtype: torch.dtype
) -> Decomposition:
    """Decompose A and G with ``method`` ("eigen" or "inverse") in ``dtype``."""
    if method == "eigen":
        return eigen_decomposition(a, g, a_diagonal, dtype)
    return inverse_decomposition(a, g, a_diagonal, damping, dtype)


def cast(decomposition: Decomposition, dtype: torch.dtype) -> Decomposition:
    """The decomposition with every tensor cast to ``dtype``."""
    if isinstance(decomposition, InverseDecomposition):
        return InverseDecomposition(decomposition.a_inv.to(dtype), decomposition.g_inv.to(dtype))
    q_a = None if decomposition.q_a is None else decomposition.q_a.to(dtype)
    return EigenDecomposition(
        q_a, decomposition.l_a.to(dtype), decomposition.q_g.to(dtype), decomposition.l_g.to(dtype)
    )


def precondition(decomposition: Decomposition, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """The preconditioned gradient matrix, in the decomposition's dtype."""
    matrix = grad.to(
        decomposition.l_g.dtype if isinstance(decomposition, EigenDecomposition) else decomposition.g_inv.dtype
    )
    if isinstance(decomposition, InverseDecomposition):
        if decomposition.a_inv.dim() == 2:  # diagonal A
            return decomposition.g_inv @ (matrix * decomposition.a_inv.unsqueeze(1))
        return decomposition.g_inv @ matrix @ decomposition.a_inv
    q_g, q_a = decomposition.q_g, decomposition.q_a
    rotated = q_g.transpose(1, 2) @ matrix
    if q_a is not None:
        rotated = rotated @ q_a
    rotated = rotated / (decomposition.l_g.unsqueeze(2) * decomposition.l_a.unsqueeze(1) + damping)
    result = q_g @ rotated
    if q_a is not None:
        result = result @ q_a.transpose(1, 2)
    return result


def kl_inner(preconditioned: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l <v_l, g_l>`` as a 0-d tensor, without a host sync (non-finite if any v or g holds a NaN/Inf)."""
    return torch.stack([(v * g.to(v.dtype)).sum() for v, g in zip(preconditioned, grads, strict=True)]).sum()


def kl_clip_scale(inner: torch.Tensor, lr: float, kl_clip: float) -> torch.Tensor:
    """``min(1, sqrt(kl_clip / (lr^2 |inner|)))`` for ``inner`` = :func:`kl_inner`, as a 0-d tensor."""
    quadratic = inner.abs() * lr**2
    return torch.clamp(torch.sqrt(kl_clip / quadratic), max=1.0)
