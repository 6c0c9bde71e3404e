"""The numerical kernels of K-FAC: safe eigh and SPD inverses, pi, KL-clip. No ranks or bytes.

The compute methods (:mod:`kfac_dist.methods`) build their decompositions from these.

Shapes follow :mod:`kfac_dist.layers.base`: A is ``(b, n, n)`` or, when diagonal, ``(b, n)``; G is ``(b, m, m)``;
a gradient matrix is ``(b, m, n)``. See docs/conventions.md for the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class DecompositionError(RuntimeError):
    """A factor could not be decomposed, even in float64."""


def is_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of every tensor is finite, from their sums (one host sync, a few operators).

    A NaN or infinity makes a sum non-finite; so does a sum past the dtype's range, which for the factors,
    eigenbases and inverses checked here means the values are unusable anyway.
    """
    total = tensors[0].sum()
    for tensor in tensors[1:]:
        total = total + tensor.sum()
    return math.isfinite(total.item())


def symmetric_eigh(matrix: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: factors are PSD) and eigenvectors, or raise DecompositionError."""
    try:
        values, vectors = torch.linalg.eigh(matrix.to(dtype))
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        raise DecompositionError(str(error)) from error
    if not is_finite(values, vectors):
        raise DecompositionError("eigh returned non-finite values")
    return values.clamp_(min=0.0), vectors


def pi_correction(a: torch.Tensor, g: torch.Tensor, a_diagonal: bool) -> torch.Tensor:
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` per block, 1 where a trace is 0."""
    mean_a = a.mean(dim=-1) if a_diagonal else torch.diagonal(a, dim1=-2, dim2=-1).mean(dim=-1)
    mean_g = torch.diagonal(g, dim1=-2, dim2=-1).mean(dim=-1)
    valid = (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(valid, mean_a / torch.where(valid, mean_g, torch.ones_like(mean_g)), torch.ones_like(mean_a))
    return ratio.sqrt()


def spd_inverse(matrix: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def kl_inner(preconditioned: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l <v_l, g_l>`` as a 0-d tensor, without a host sync (non-finite if any v or g holds a NaN/Inf)."""
    products = torch._foreach_mul(
        list(preconditioned), [g.to(v.dtype) for v, g in zip(preconditioned, grads, strict=True)]
    )
    return torch.stack([product.sum() for product in products]).sum()


def kl_clip_scale(inner: torch.Tensor, lr: float, kl_clip: float) -> torch.Tensor:
    """``min(1, sqrt(kl_clip / (lr^2 |inner|)))`` for ``inner`` = :func:`kl_inner`, as a 0-d tensor."""
    quadratic = inner.abs() * lr**2
    return torch.clamp(torch.sqrt(kl_clip / quadratic), max=1.0)
