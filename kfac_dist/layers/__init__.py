"""Module families kfac-dist preconditions, and the rule that decides which modules qualify."""

from __future__ import annotations

from torch import nn

from kfac_dist.layers.base import KFACLayer
from kfac_dist.layers.conv import ConvLayer
from kfac_dist.layers.embedding import EmbeddingLayer
from kfac_dist.layers.linear import LinearLayer

__all__ = [
    "KFACLayer",
    "ConvLayer",
    "EmbeddingLayer",
    "LinearLayer",
    "make_layer",
    "has_trainable_parameters",
]


def has_trainable_parameters(module: nn.Module) -> bool:
    """Whether the module itself (not its children) owns a parameter that requires a gradient."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


def make_layer(name: str, module: nn.Module) -> KFACLayer | str:
    """The curvature helper of a trainable module, or the reason it cannot be preconditioned."""
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "nn.Embedding(sparse=True): sparse gradients are not preconditioned"
        layer: KFACLayer = EmbeddingLayer(name, module)
    elif isinstance(module, nn.Linear):
        layer = LinearLayer(name, module)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        layer = ConvLayer(name, module)
    else:
        return f"{type(module).__name__} is not a supported layer type"
    if not all(p.requires_grad for p in layer.parameters()):
        return "only some of its parameters require gradients"
    return layer
