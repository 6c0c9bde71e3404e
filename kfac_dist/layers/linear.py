"""Curvature of ``nn.Linear``: every leading index of the input is a row."""

from __future__ import annotations

import torch
from torch import nn

from kfac_dist.layers.base import KFACLayer, append_ones, copy_grad


class LinearLayer(KFACLayer):
    """K-FAC factors of a linear layer ``s = W a + b``."""

    module: nn.Linear
    reshaped_weight = True

    @property
    def blocks(self) -> int:
        """A linear layer is one block."""
        return 1

    @property
    def a_side(self) -> int:
        """Input features, plus one for the bias."""
        return self.module.in_features + int(self.has_bias)

    @property
    def g_side(self) -> int:
        """Output features."""
        return self.module.out_features

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """Every leading index is a row."""
        rows = inputs.reshape(-1, self.module.in_features)
        if self.has_bias:
            rows = append_ones(rows)
        return rows.unsqueeze(0)

    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Every leading index is a row."""
        return grad_output.reshape(1, -1, self.module.out_features)

    def grad_matrix(self) -> torch.Tensor:
        """``[dW | db]`` as a ``(1, out, in[+1])`` matrix."""
        weight_grad = self.module.weight.grad
        assert weight_grad is not None
        if self.has_bias:
            bias_grad = self.module.bias.grad
            assert bias_grad is not None
            return torch.cat([weight_grad, bias_grad.unsqueeze(1)], dim=1).unsqueeze(0)
        return weight_grad.unsqueeze(0)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        """Write ``[dW | db]`` back."""
        weight, bias = self._split_bias(matrix[0])
        copy_grad(self.module.weight, weight)
        if bias is not None:
            copy_grad(self.module.bias, bias)
