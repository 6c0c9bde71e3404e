"""Triangular packing of symmetric matrices."""

from __future__ import annotations

import pytest
import torch

from kfac_dist.comm import pack_upper, packed_numel, unpack_upper


def _symmetric(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(*shape, dtype=dtype)
    return x + x.transpose(-1, -2)


def test_pack_order_is_the_upper_triangle_row_by_row() -> None:
    t = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    assert torch.equal(pack_upper(t), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert torch.equal(unpack_upper(pack_upper(t), 3), t)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact_for_a_matrix(n: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n)
    t = _symmetric(n, n, dtype=dtype)
    flat = pack_upper(t)
    assert flat.shape == (packed_numel(n),) == (n * (n + 1) // 2,)
    assert flat.dtype == dtype
    assert torch.equal(unpack_upper(flat, n), t)


@pytest.mark.parametrize("blocks", [1, 3])
def test_round_trip_is_exact_for_stacked_blocks(blocks: int) -> None:
    torch.manual_seed(blocks)
    t = _symmetric(blocks, 5, 5)
    flat = pack_upper(t)
    assert flat.shape == (packed_numel(5, blocks),) == (blocks * 15,)
    out = unpack_upper(flat, 5, blocks)
    assert out.shape == (blocks, 5, 5)
    assert torch.equal(out, t)
    for i in range(blocks):  # blocks are packed one after the other
        assert torch.equal(flat[15 * i : 15 * (i + 1)], pack_upper(t[i]))


def test_non_contiguous_input_and_non_symmetric_input() -> None:
    t = _symmetric(6, 6, dtype=torch.float64).t()  # a transposed view
    assert not t.is_contiguous()
    assert torch.equal(unpack_upper(pack_upper(t), 6), t)
    upper = torch.arange(16.0).reshape(4, 4)
    rebuilt = unpack_upper(pack_upper(upper), 4)
    assert torch.equal(rebuilt, torch.triu(upper) + torch.triu(upper, 1).t())


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(n, n\) or \(b, n, n\)"):
        pack_upper(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(n, n\) or \(b, n, n\)"):
        pack_upper(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="expected a 1-D tensor of 6 elements"):
        unpack_upper(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="expected a 1-D tensor of 12 elements for 2 packed"):
        unpack_upper(torch.zeros(6), 3, 2)
