"""Model zoo: a registry of the networks used by kfac-dist's examples, tests and benchmarks.

``build_model(name, **kwargs)`` builds any model in :data:`MODEL_NAMES`; every model can be built on the meta
device (``with torch.device("meta"): build_model("resnet50")``) to read layer shapes without allocating
memory.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kfac_dist.app.models.cifar_resnet import CifarResNet, cifar_resnet20, cifar_resnet32, cifar_resnet56
from kfac_dist.app.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from kfac_dist.app.models.small import autoencoder, mlp, small_cnn

__all__ = ["MODEL_NAMES", "CifarResNet", "ResNet", "build_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "mlp": mlp,
    "autoencoder": autoencoder,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "cifar_resnet56": cifar_resnet56,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_model`."""


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by name.

    Args:
        name: One of :data:`MODEL_NAMES`.
        **kwargs: Passed to the model's constructor (e.g. ``num_classes``; ``width_multiplier`` for ImageNet
            ResNets; ``hidden`` for ``mlp`` and ``autoencoder``).

    Returns:
        The model, on the current default device and dtype.

    Raises:
        ValueError: If ``name`` is not a known model.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}") from None
    return factory(**kwargs)
