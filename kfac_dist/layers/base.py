"""The curvature interface of one module family: what a layer contributes to its Kronecker factors.

A layer knows how to turn a captured module input into the sum of ``a a^T`` over its rows, a captured output
gradient into the sum of ``g g^T`` over its rows, and how to read and write its gradient as a matrix. It knows
nothing of ranks, groups, running averages or decompositions.

Shapes (``b`` = number of independent blocks, e.g. convolution groups):
- A factor: ``(b, n, n)``, or ``(b, n)`` when ``a_diagonal`` (only the diagonal is stored),
- G factor: ``(b, m, m)``,
- gradient matrix: ``(b, m, n)``, the weight (and bias as a trailing column) of each block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import cast

import torch
from torch import nn

from kfac_dist.precision import gram, operand_dtype


class KFACLayer(ABC):
    """Kronecker-factored curvature of one module.

    Args:
        name: the module's qualified name in the model.
        module: the module itself.
    """

    #: True when the A factor is diagonal and stored as a ``(b, n)`` tensor.
    a_diagonal: bool = False
    #: True when the gradient matrix is the weight's gradient reshaped to ``(b, m, n_w)``, with the bias gradient
    #: (if any) as a last column: same-shaped layers of such a type are read and written as one stacked tensor
    #: (:mod:`kfac_dist.layers.batched`); other types go through :meth:`grad_matrix` / :meth:`set_grad_matrix`.
    reshaped_weight: bool = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def has_bias(self) -> bool:
        """Whether the module has a bias folded into A as a trailing 1."""
        return getattr(self.module, "bias", None) is not None

    @property
    @abstractmethod
    def blocks(self) -> int:
        """Number of independent (A, G) pairs of this layer."""

    @property
    @abstractmethod
    def a_side(self) -> int:
        """Side ``n`` of each A block (including the bias entry)."""

    @property
    @abstractmethod
    def g_side(self) -> int:
        """Side ``m`` of each G block."""

    @property
    def grad_numel(self) -> int:
        """Number of gradient elements this layer preconditions."""
        return sum(p.numel() for p in self.parameters())

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients this layer preconditions (weight, then bias)."""
        params = [cast(nn.Parameter, self.module.weight)]
        if self.has_bias:
            params.append(cast(nn.Parameter, self.module.bias))
        return params

    @abstractmethod
    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input rows ``a`` of a module input, shaped ``(b, rows, n)`` (with the bias column)."""

    @abstractmethod
    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """The output-gradient rows of a module output gradient, shaped ``(b, rows, m)``."""

    @staticmethod
    def examples(inputs: torch.Tensor) -> int:
        """Number of examples in a module input: its leading dimension (1 for a single unbatched row)."""
        return int(inputs.shape[0]) if inputs.dim() > 1 else 1

    def a_contribution(
        self, inputs: torch.Tensor, dtype: torch.dtype, precision: str = "highest"
    ) -> tuple[torch.Tensor, int]:
        """Sum over rows of ``a a^T`` for one module call in ``dtype``, and the number of rows.

        ``precision``: :mod:`kfac_dist.precision` (``"bf16"`` rounds the rows to bfloat16).
        """
        rows = self.input_rows(inputs.to(operand_dtype(precision, dtype)))
        return gram(rows).to(dtype), rows.shape[1]

    def g_contribution(
        self, grad_output: torch.Tensor, dtype: torch.dtype, scale: float, precision: str = "highest"
    ) -> torch.Tensor:
        """Sum over rows of ``g g^T`` for one output gradient in ``dtype``, with ``g = scale * grad_output``."""
        rows = self.output_rows(grad_output.to(operand_dtype(precision, dtype))) * scale
        return gram(rows).to(dtype)

    @abstractmethod
    def grad_matrix(self) -> torch.Tensor:
        """The current gradient as a ``(b, m, n)`` matrix (weight columns, then the bias column)."""

    @abstractmethod
    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        """Write a ``(b, m, n)`` matrix back into the parameters' ``.grad`` (cast to their dtype)."""

    def has_grad(self) -> bool:
        """Whether every preconditioned parameter holds a gradient."""
        return all(p.grad is not None for p in self.parameters())

    def _split_bias(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a ``(b, m, n)`` matrix into its weight part and its bias column (or None)."""
        if self.has_bias:
            return matrix[..., :-1], matrix[..., -1]
        return matrix, None


def append_ones(rows: torch.Tensor) -> torch.Tensor:
    """Append a column of ones to ``(..., n)`` rows (the bias input)."""
    ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, ones], dim=-1)


def copy_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite ``param.grad`` in place (keeps DDP's gradient bucket views intact)."""
    assert param.grad is not None
    param.grad.copy_(value.reshape(param.grad.shape))
