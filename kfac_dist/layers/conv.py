"""Curvature of ``nn.Conv1d`` and ``nn.Conv2d`` (KFC, Grosse & Martens 2016, "expand" convention).

Every (example, output location) pair is a row. The input row ``a`` is the im2col patch the kernel sees at that
location, honouring stride, padding (ints, ``'same'``, ``'valid'``), ``padding_mode``, dilation and groups.
A grouped convolution (including depthwise) is ``groups`` independent layers: one (A, G) block per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist.layers.base import KFACLayer, append_ones, copy_grad


def _as_pair(value: tuple[int, ...], is_1d: bool) -> tuple[int, int]:
    """A 1-d convolution parameter as the 2-d pair ``(1, value)``."""
    return (1, value[0]) if is_1d else (value[0], value[1])


class ConvLayer(KFACLayer):
    """K-FAC factors of a 1-d or 2-d convolution."""

    module: nn.Conv1d | nn.Conv2d
    reshaped_weight = True

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(name, module)
        self._is_1d = isinstance(module, nn.Conv1d)

    @property
    def blocks(self) -> int:
        """One block per convolution group."""
        return self.module.groups

    @property
    def _patch_size(self) -> int:
        """Input channels of one group times the kernel size."""
        weight = self.module.weight
        return weight.shape[1] * math.prod(weight.shape[2:])

    @property
    def a_side(self) -> int:
        """Patch size of one group, plus one for the bias."""
        return self._patch_size + int(self.has_bias)

    @property
    def g_side(self) -> int:
        """Output channels of one group."""
        return self.module.out_channels // self.module.groups

    def _padded(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input padded exactly as the module pads it (zeros or its ``padding_mode``)."""
        pads = self.module._reversed_padding_repeated_twice
        if not any(pads):
            return inputs
        if self.module.padding_mode == "zeros":
            return F.pad(inputs, list(pads), mode="constant", value=0.0)
        return F.pad(inputs, list(pads), mode=self.module.padding_mode)

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """im2col patches, ``(groups, examples * locations, patch [+1])``."""
        if inputs.dim() == len(self.module.weight.shape) - 1:  # unbatched input
            inputs = inputs.unsqueeze(0)
        padded = self._padded(inputs)
        if self._is_1d:
            padded = padded.unsqueeze(2)
        kernel = _as_pair(self.module.kernel_size, self._is_1d)
        stride = _as_pair(self.module.stride, self._is_1d)
        if kernel == (1, 1):  # pointwise: the patches are the strided input itself, no im2col copy
            patches = padded[:, :, :: stride[0], :: stride[1]].flatten(2)
        else:
            patches = F.unfold(
                padded, kernel_size=kernel, dilation=_as_pair(self.module.dilation, self._is_1d), stride=stride
            )  # (N, C * k, L), channel-major, so each group's channels are contiguous
        batch, _, locations = patches.shape
        groups = self.module.groups
        rows = patches.reshape(batch, groups, self._patch_size, locations)
        rows = rows.permute(1, 0, 3, 2).reshape(groups, batch * locations, self._patch_size)
        return append_ones(rows) if self.has_bias else rows

    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Output gradients, ``(groups, examples * locations, out_channels / groups)``."""
        if grad_output.dim() == len(self.module.weight.shape) - 1:
            grad_output = grad_output.unsqueeze(0)
        batch = grad_output.shape[0]
        groups = self.module.groups
        per_group = grad_output.reshape(batch, groups, self.g_side, -1)
        return per_group.permute(1, 0, 3, 2).reshape(groups, -1, self.g_side)

    def grad_matrix(self) -> torch.Tensor:
        """Per group, ``[dW | db]`` as ``(groups, out / groups, patch [+1])``."""
        weight_grad = self.module.weight.grad
        assert weight_grad is not None
        matrix = weight_grad.reshape(self.blocks, self.g_side, self._patch_size)
        if self.has_bias:
            assert self.module.bias is not None
            bias_grad = self.module.bias.grad
            assert bias_grad is not None
            matrix = torch.cat([matrix, bias_grad.reshape(self.blocks, self.g_side, 1)], dim=2)
        return matrix

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        """Write the per-group ``[dW | db]`` back."""
        weight, bias = self._split_bias(matrix)
        copy_grad(self.module.weight, weight)
        if bias is not None:
            assert self.module.bias is not None
            copy_grad(self.module.bias, bias)
