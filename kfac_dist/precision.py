"""The precision of K-FAC's own matrix products (``KFACOptions.precision``): exact, TF32 or bf16 inputs.

- ``"highest"``: products in the factors' and decompositions' own dtype (float32 or float64), as before: the exact
  mode every exactness test runs.
- ``"tf32"``: float32 products on CUDA use TensorFloat-32 (10-bit mantissa inputs, float32 accumulation) inside
  K-FAC's phases only (:func:`matmul_mode`); the model's own matmuls keep the process's setting. On a CPU it is
  ``"highest"``.
- ``"bf16"``: the operands of K-FAC's products (the rows of the factor contributions, the gradient and the
  preconditioner's terms) are rounded to bfloat16; CUDA accumulates and returns float32 (``torch.bmm`` with
  ``out_dtype``), elsewhere the bfloat16 product is widened back to float32.

Float64 products are never lowered: a float64 run stays exact whatever the option says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("highest", "tf32", "bf16")


def operand_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the operands of a product meant for ``dtype`` are rounded to at ``precision``."""
    return torch.bfloat16 if precision == "bf16" and dtype == torch.float32 else dtype


def widened(dtype: torch.dtype) -> torch.dtype:
    """The dtype a product of ``dtype`` operands is returned in (float32 for bfloat16)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``; with a bfloat16 operand (``"bf16"`` precision), both rounded and a float32 result."""
    if torch.bfloat16 not in (a.dtype, b.dtype):
        return torch.bmm(a, b)
    low_a, low_b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.is_cuda:
        return torch.bmm(low_a, low_b, out_dtype=torch.float32)
    return torch.bmm(low_a, low_b).to(torch.float32)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` per block of ``(b, r, n)`` rows (float32 for bfloat16 rows)."""
    return bmm(rows.mT, rows)


@contextlib.contextmanager
def matmul_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Within the block, CUDA float32 matmuls use TF32 if ``precision`` is ``"tf32"`` (restored afterwards)."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
