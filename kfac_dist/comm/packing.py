"""Triangular packing of symmetric matrices: send ``n (n + 1) / 2`` numbers instead of ``n * n``.

Packing and unpacking only copy values (no arithmetic), so ``unpack_upper(pack_upper(t), n, blocks)`` returns
exactly ``t`` for symmetric ``t``. For a non-symmetric ``t`` the result is the symmetric matrix built from its
upper triangle.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kfac_dist.comm.layout import packed_numel


def pack_upper(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack the upper triangles (diagonal included, row by row) of an ``(n, n)`` or ``(b, n, n)`` tensor.

    Returns a 1-D tensor of `packed_numel(n, b)` elements, block after block: ``out`` (a contiguous 1-D tensor of
    that size and the same dtype) when given, written in place, else a new one.
    """
    n = _side(t)
    flat = t.reshape(-1, n * n)
    index = _upper_index(n, t.device)
    if out is None:
        return flat.index_select(1, index).reshape(-1)
    torch.index_select(flat, 1, index, out=out.view(flat.shape[0], -1))
    return out


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
    square = flat.reshape(count, -1).index_select(1, _square_index(n, flat.device)).reshape(count, n, n)
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
def _square_index(n: int, device: torch.device) -> torch.Tensor:
    """For each flat position ``i * n + j`` of a square, the packed position of ``(min(i, j), max(i, j))``."""
    rows, cols = torch.triu_indices(n, n, device=device)
    index = torch.empty(n * n, dtype=torch.long, device=device)
    packed = torch.arange(rows.numel(), device=device)
    index[rows * n + cols] = packed
    index[cols * n + rows] = packed
    return index
