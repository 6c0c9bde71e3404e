"""Triangular packing of symmetric matrices: send ``n (n + 1) / 2`` numbers instead of ``n * n``.

Packing and unpacking only copy values (no arithmetic), so ``unpack_upper(pack_upper(t), n, blocks)`` returns
exactly ``t`` for symmetric ``t``. For a non-symmetric ``t`` the result is the symmetric matrix built from its
upper triangle.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kfac_dist.comm.layout import packed_numel


def pack_upper(t: torch.Tensor) -> torch.Tensor:
    """Pack the upper triangles (diagonal included, row by row) of an ``(n, n)`` or ``(b, n, n)`` tensor.

    Returns a new 1-D tensor of `packed_numel(n, b)` elements, block after block.
    """
    n = _side(t)
    flat = t.reshape(-1, n * n)
    return flat.index_select(1, _upper_index(n, t.device)).reshape(-1)


def unpack_upper(flat: torch.Tensor, n: int, blocks: int | None = None) -> torch.Tensor:
    """Rebuild symmetric matrices from `pack_upper` output.

    Returns an ``(n, n)`` tensor when `blocks` is None, else a ``(blocks, n, n)`` tensor.
    """
    count = 1 if blocks is None else blocks
    if flat.dim() != 1 or flat.numel() != packed_numel(n, count):
        raise ValueError(
            f"expected a 1-D tensor of {packed_numel(n, count)} elements for {count} packed ({n}, {n}) "
            f"matrices, got shape {tuple(flat.shape)}"
        )
    rows = flat.reshape(count, -1)
    out = flat.new_empty((count, n * n))
    out.index_copy_(1, _upper_index(n, flat.device), rows)
    out.index_copy_(1, _lower_index(n, flat.device), rows)
    square = out.reshape(count, n, n)
    return square[0] if blocks is None else square


def _side(t: torch.Tensor) -> int:
    if t.dim() not in (2, 3) or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"expected an (n, n) or (b, n, n) tensor, got shape {tuple(t.shape)}")
    return int(t.shape[-1])


@lru_cache(maxsize=256)
def _upper_index(n: int, device: torch.device) -> torch.Tensor:
    """Flat indices ``i * n + j`` of the upper triangle, ``i <= j``, row by row."""
    rows, cols = torch.triu_indices(n, n, device=device)
    index: torch.Tensor = rows * n + cols
    return index


@lru_cache(maxsize=256)
def _lower_index(n: int, device: torch.device) -> torch.Tensor:
    """The mirrored indices ``j * n + i`` of `_upper_index`, in the same order."""
    rows, cols = torch.triu_indices(n, n, device=device)
    index: torch.Tensor = cols * n + rows
    return index
