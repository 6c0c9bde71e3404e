"""Module families kfac-dist preconditions: a table of module type -> layer, and the rule that decides.

:data:`LAYER_TYPES` maps a module type to the factory of its :class:`KFACLayer`; :func:`make_layer` looks a
module's type up along its MRO (the most specific registered type wins, so a subclass of ``nn.Linear`` is a
linear layer unless its own type is registered). :func:`register_layer_type` adds a user's module type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kfac_dist.layers.base import KFACLayer
from kfac_dist.layers.conv import ConvLayer
from kfac_dist.layers.embedding import EmbeddingLayer
from kfac_dist.layers.linear import LinearLayer

__all__ = [
    "KFACLayer",
    "ConvLayer",
    "EmbeddingLayer",
    "LAYER_TYPES",
    "LayerFactory",
    "LinearLayer",
    "make_layer",
    "has_trainable_parameters",
    "register_layer_type",
]

#: Builds the layer of a module from its qualified name and the module (a :class:`KFACLayer` subclass is one),
#: or returns why that module cannot be preconditioned.
LayerFactory = Callable[[str, Any], KFACLayer | str]


def _embedding_layer(name: str, module: nn.Embedding) -> KFACLayer | str:
    """Dense embeddings only: a sparse gradient has no matrix to precondition."""
    if module.sparse:
        return "nn.Embedding(sparse=True): sparse gradients are not preconditioned"
    return EmbeddingLayer(name, module)


#: The module types K-FAC preconditions, and how (see :func:`register_layer_type` to add one).
LAYER_TYPES: dict[type[nn.Module], LayerFactory] = {
    nn.Linear: LinearLayer,
    nn.Conv1d: ConvLayer,
    nn.Conv2d: ConvLayer,
    nn.Embedding: _embedding_layer,
}


def register_layer_type(module_type: type[nn.Module], layer_class: LayerFactory, *, replace: bool = False) -> None:
    """Precondition every module of `module_type` (and of its subclasses) with `layer_class`.

    `layer_class` is a :class:`KFACLayer` subclass (or a callable ``(name, module)`` that returns one, or a
    string saying why a module cannot be preconditioned). The preconditioner captures the module's first
    positional input in forward and its output gradient in backward; the subclass turns them into Kronecker
    factors and reads and writes the gradient as a matrix. It must implement:

    - ``blocks``, ``a_side``, ``g_side`` (properties): the number of independent (A, G) pairs and the side of
      each A block (with the bias entry) and G block;
    - ``input_rows(inputs)``: the rows ``a`` of a module input, shaped ``(blocks, rows, a_side)``;
    - ``output_rows(grad_output)``: the rows ``g`` of an output gradient, shaped ``(blocks, rows, g_side)``;
    - ``grad_matrix()`` / ``set_grad_matrix(matrix)``: the gradient as a ``(blocks, g_side, a_side)`` matrix
      (weight columns, then the bias column), and writing one back into the parameters' ``.grad`` in place.

    By default the layer preconditions ``module.weight`` and, when it is not None, ``module.bias`` (override
    ``parameters`` and ``has_bias`` otherwise); a diagonal A factor sets ``a_diagonal = True`` and overrides
    ``a_contribution`` (see :class:`EmbeddingLayer`).

    Args:
        module_type: The module class, e.g. a user's ``nn.Module`` subclass.
        layer_class: Its layer: a :class:`KFACLayer` subclass or a :data:`LayerFactory`.
        replace: Replace the layer of a type that is already registered (its own, not a base class's).

    Raises:
        ValueError: `module_type` is registered already and `replace` is False.
        TypeError: `module_type` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_type: module_type={module_type!r} is not an nn.Module subclass")
    if module_type in LAYER_TYPES and not replace:
        raise ValueError(
            f"register_layer_type: {module_type.__qualname__} is registered already "
            f"(with {getattr(LAYER_TYPES[module_type], '__qualname__', LAYER_TYPES[module_type])}); "
            "pass replace=True to replace it"
        )
    LAYER_TYPES[module_type] = layer_class


def has_trainable_parameters(module: nn.Module) -> bool:
    """Whether the module itself (not its children) owns a parameter that requires a gradient."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


def make_layer(name: str, module: nn.Module) -> KFACLayer | str:
    """The curvature helper of a trainable module, or the reason it cannot be preconditioned."""
    factory = next((LAYER_TYPES[kind] for kind in type(module).__mro__ if kind in LAYER_TYPES), None)
    if factory is None:
        return f"{type(module).__name__} is not a supported layer type"
    layer = factory(name, module)
    if isinstance(layer, str):
        return layer
    if not all(p.requires_grad for p in layer.parameters()):
        return "only some of its parameters require gradients"
    return layer
