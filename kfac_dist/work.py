"""The work of one K-FAC step, per layer and phase: the one count of the library's kernels that models price.

Pure arithmetic on a :class:`~kfac_dist.placement.LayerShape` (no tensors). The method-dependent parts (the
decomposition's and the preconditioning's FLOPs, the decomposition's fields) come from the compute-method table
:data:`kfac_dist.methods.METHODS`; the rest is counted here from the library's code, per layer with ``R`` rows (the
examples times output locations, per block), bytes read + written, ``e`` bytes per element:

- ``factor_computation`` (factor steps): the im2col of A's rows (a convolution wider than 1x1), the pad and permute
  copies of the rows of A and G, the scaling of G's rows, the Gram GEMMs ``rows^T rows`` (none for a diagonal A)
  and two normalising divisions (6 memory-bound ops);
- ``factor_update`` (factor steps): ``isfinite(.).all()`` of A and G, their ``&`` and two running averages;
- ``decomposition`` (inverse steps): the method's decompositions (one per factor and block, none for a diagonal A),
  finite checks of every field it stores, one elementwise pass (the clamps) over each of its vector fields;
- ``preconditioning`` (every step): the method's GEMMs (pairs of one-sided products of ``2 a g (a + g)`` FLOPs)
  and three elementwise ops over the gradient (eigenvalue outer product, damping, division);
- ``kl_clip`` (every step): the inner product (``mul`` + ``sum``), the scaling and the copy into ``.grad``.

:func:`kfac_dist.placement.compute_cost`, the load placement balances, is proportional to the decomposition FLOPs
of every method for a layer without a diagonal A (tests/test_work.py holds them together).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kfac_dist.costs import factor_storage_numel
from kfac_dist.methods import METHODS
from kfac_dist.placement import LayerShape

__all__ = ["LAYER_PHASES", "Work", "layer_work"]

#: The K-FAC phases with per-layer work (the exchanges are priced per bucket, not per layer).
LAYER_PHASES = ("factor_computation", "factor_update", "decomposition", "preconditioning", "kl_clip")


@dataclass(frozen=True)
class Work:
    """Calls of each kernel and their FLOPs or bytes (``decompositions``: calls of the method's decomposition)."""

    gemm_calls: float = 0.0
    gemm_flops: float = 0.0
    copy_calls: float = 0.0
    copy_bytes: float = 0.0
    im2col_calls: float = 0.0
    im2col_bytes: float = 0.0
    finite_calls: float = 0.0
    finite_bytes: float = 0.0
    decompositions: float = 0.0
    decomposition_flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        """Both works."""
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def layer_work(
    shape: LayerShape, phase: str, *, method: str, rows: int = 0, unfold: bool = False, element_bytes: int = 4
) -> Work:
    """The work of one layer (all its blocks) in one phase of :data:`LAYER_PHASES` (see the module docstring).

    Args:
        shape: the layer.
        phase: the phase; any other phase has no per-layer work.
        rows: rows of A and G per block (examples x output locations); only ``factor_computation`` needs them.
        unfold: the layer's rows go through ``F.unfold`` (a convolution with a kernel larger than 1x1).
        method: the compute method, a key of :data:`~kfac_dist.methods.METHODS`.
        element_bytes: bytes per element of the factors, decompositions and gradients.
    """
    b, a, g, e = shape.blocks, shape.a_side, shape.g_side, element_bytes
    squares = factor_storage_numel(shape)  # b (a^2 + g^2); a diagonal A: b (a + g^2)
    gradient = float(b * a * g)
    if phase == "factor_computation":
        grams = b * (g * g + (0 if shape.a_diagonal else a * a))  # a diagonal A is summed, not multiplied
        return Work(
            gemm_calls=b * (1 if shape.a_diagonal else 2),
            gemm_flops=2.0 * rows * grams,
            copy_calls=6 * b,
            copy_bytes=e * (2.0 * rows * a * b + 4.0 * rows * g * b + 2.0 * squares),
            im2col_calls=b * unfold,
            im2col_bytes=e * rows * a * b * unfold,
        )
    if phase == "factor_update":
        return Work(copy_calls=5 * b, copy_bytes=5.0 * e * squares, finite_calls=2 * b, finite_bytes=e * squares)
    compute = METHODS[method]
    if phase == "decomposition":
        stored = compute.fields(shape)
        vectors = [s for _, s, _ in stored if len(s) == 2]
        return Work(
            copy_calls=len(vectors) * b,
            copy_bytes=2.0 * e * sum(s[0] * s[1] for s in vectors),
            finite_calls=len(stored) * b,
            finite_bytes=e * compute.storage_numel(shape),
            decompositions=b * (1 if shape.a_diagonal else 2),
            decomposition_flops=compute.decomposition_flops(shape),
        )
    if phase == "preconditioning":
        flops = compute.precondition_flops(shape)
        pairs = flops / (2.0 * a * g * (a + g))  # one-sided products from the left and from the right
        return Work(gemm_calls=2 * pairs, gemm_flops=flops, copy_calls=3 * b, copy_bytes=6.0 * e * gradient)
    if phase == "kl_clip":
        return Work(copy_calls=4 * b, copy_bytes=8.0 * e * gradient)
    return Work()
