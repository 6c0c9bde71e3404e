"""Gradients of same-shaped layers read and written as one stacked matrix, in a constant number of operators.

A shape group (:mod:`kfac_dist.worklist`) preconditions its layers' gradients as one ``(L*b, m, n)`` tensor. For
layer types whose gradient matrix is a reshaped weight gradient (``KFACLayer.reshaped_weight``) reading takes one
``stack`` (two with a bias) and writing one ``unbind`` per parameter plus one ``_foreach_copy_`` for every layer of
the step; other types fall back to their own :meth:`~kfac_dist.layers.KFACLayer.grad_matrix` and
:meth:`~kfac_dist.layers.KFACLayer.set_grad_matrix`, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kfac_dist.layers.base import KFACLayer


def _grad(param: torch.Tensor) -> torch.Tensor:
    assert param.grad is not None
    return param.grad


def stack_grad_matrices(layers: Sequence[KFACLayer]) -> torch.Tensor:
    """The gradient matrices of same-shaped layers of one type, concatenated along blocks: ``(L*b, m, n)``."""
    first = layers[0]
    if not first.reshaped_weight:
        return torch.cat([layer.grad_matrix() for layer in layers])
    blocks, side = len(layers) * first.blocks, first.g_side
    weights = torch.stack([_grad(layer.parameters()[0]) for layer in layers]).view(blocks, side, -1)
    if not first.has_bias:
        return weights
    biases = torch.stack([_grad(layer.parameters()[1]) for layer in layers]).view(blocks, side, 1)
    return torch.cat([weights, biases], dim=2)


def write_grad_matrices(
    layers: Sequence[KFACLayer], matrix: torch.Tensor, copies: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Write a stacked ``(L*b, m, n)`` matrix back into the layers' ``.grad``.

    Layers of a ``reshaped_weight`` type append ``(grad, value)`` pairs to ``copies`` (the caller copies them all
    with one ``torch._foreach_copy_``); others are written here, one layer at a time.
    """
    first = layers[0]
    if not first.reshaped_weight:
        for layer, part in zip(layers, matrix.split(first.blocks), strict=True):
            layer.set_grad_matrix(part)
        return
    count = len(layers)
    weights = matrix[..., :-1] if first.has_bias else matrix
    weight_shape = first.parameters()[0].shape
    grads = [_grad(layer.parameters()[0]) for layer in layers]
    copies.extend(zip(grads, weights.reshape(count, *weight_shape).unbind(0), strict=True))
    if first.has_bias:
        bias_grads = [_grad(layer.parameters()[1]) for layer in layers]
        copies.extend(zip(bias_grads, matrix[..., -1].reshape(count, -1).unbind(0), strict=True))
