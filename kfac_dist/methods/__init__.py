"""The compute methods, by name: the one table everything that depends on ``compute_method`` reads.

Adding a method: a module here with one :class:`ComputeMethod` subclass, and its row in :data:`METHODS`
(docs/architecture.md, "How to add a compute method").
"""

from __future__ import annotations

from kfac_dist.methods.base import ComputeMethod, Decomposition, Field, wire_numel
from kfac_dist.methods.eigen import EIGH_FLOPS_PER_N3, EigenMethod
from kfac_dist.methods.inverse import InverseMethod
from kfac_dist.methods.warm_eigen import WarmEigenMethod

__all__ = [
    "COMPUTE_METHODS",
    "EIGH_FLOPS_PER_N3",
    "METHODS",
    "ComputeMethod",
    "Decomposition",
    "Field",
    "get_method",
    "wire_numel",
]

#: Every compute method by its name.
METHODS: dict[str, ComputeMethod] = {
    method.name: method for method in (EigenMethod(), InverseMethod(), WarmEigenMethod())
}
#: The allowed values of the ``compute_method`` option.
COMPUTE_METHODS = tuple(METHODS)


def get_method(name: str) -> ComputeMethod:
    """The compute method called ``name``; a ValueError naming ``compute_method`` for an unknown one."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"compute_method must be one of {', '.join(map(repr, METHODS))}; got {name!r}") from None
