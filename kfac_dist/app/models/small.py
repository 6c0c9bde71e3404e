"""Small models for MNIST-sized inputs (28x28, 1 channel): a CNN, an MLP and a deep autoencoder."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["autoencoder", "mlp", "small_cnn"]


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A LeNet-style CNN for 28x28 inputs (18,378 parameters with the defaults).

    Layout: conv(in->16, 5) + ReLU + maxpool(2) -> conv(16->32, 5) + ReLU + maxpool(2) -> flatten ->
    linear(512 -> num_classes). Its largest K-FAC factor side is 513 (the linear layer's input plus bias), so
    a CPU step on a batch of 64 takes a few milliseconds.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.

    Returns:
        The model; module names are ``conv1``, ``relu1``, ``pool1``, ``conv2``, ``relu2``, ``pool2``,
        ``flatten``, ``fc``.
    """
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_channels, 16, kernel_size=5))
    model.add_module("relu1", nn.ReLU(inplace=True))
    model.add_module("pool1", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(16, 32, kernel_size=5))
    model.add_module("relu2", nn.ReLU(inplace=True))
    model.add_module("pool2", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(32 * 4 * 4, num_classes))
    return model


def mlp(
    in_features: int = 28 * 28,
    hidden: Sequence[int] = (128, 64),
    num_classes: int = 10,
) -> nn.Sequential:
    """A fully connected ReLU network; inputs of any shape ``(N, ...)`` are flattened first.

    Args:
        in_features: Number of input features after flattening (784 for MNIST).
        hidden: Widths of the hidden layers, in order.
        num_classes: Number of output logits.

    Returns:
        The model; module names are ``flatten``, ``fc1``, ``relu1``, ..., ``fc{len(hidden)+1}``.

    Raises:
        ValueError: If a width is not positive.
    """
    widths = [in_features, *hidden]
    if any(w <= 0 for w in (*widths, num_classes)):
        raise ValueError(f"mlp: in_features, hidden and num_classes must be positive, got {widths}, {num_classes}")
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        model.add_module(f"fc{i}", nn.Linear(d_in, d_out))
        model.add_module(f"relu{i}", nn.ReLU(inplace=True))
    model.add_module(f"fc{len(widths)}", nn.Linear(widths[-1], num_classes))
    return model


def autoencoder(in_features: int = 28 * 28, hidden: Sequence[int] = (256, 128, 32)) -> nn.Sequential:
    """A deep tanh autoencoder, the classic K-FAC benchmark (Hinton & Salakhutdinov; Martens & Grosse) scaled down.

    Layout with the defaults: flatten -> 784-256-128-32 encoder -> 32-128-256-784 mirrored decoder; Tanh follows
    every linear layer except the code layer (the last encoder layer, a linear code) and the output layer. The
    outputs are logits: train with ``F.binary_cross_entropy_with_logits(model(x), x.flatten(1))`` on pixel
    intensities in [0, 1]. 476,720 parameters with the defaults (6 linear layers, largest K-FAC factor side 785).

    Args:
        in_features: Number of input features after flattening (784 for MNIST); also the output width.
        hidden: Widths of the encoder layers, in order; the last is the code width.

    Returns:
        The model; module names are ``flatten``, ``fc1``, ``act1``, ..., ``fc{2*len(hidden)}`` (no ``act`` after
        the code layer ``fc{len(hidden)}`` or the output layer).

    Raises:
        ValueError: If ``hidden`` is empty or a width is not positive.
    """
    encoder = [in_features, *hidden]
    if not hidden or any(w <= 0 for w in encoder):
        raise ValueError(f"autoencoder: in_features and hidden must be positive and hidden non-empty, got {encoder}")
    widths = [*encoder, *reversed(encoder[:-1])]
    code_layer = len(hidden)
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        model.add_module(f"fc{i}", nn.Linear(d_in, d_out))
        if i not in (code_layer, len(widths) - 1):
            model.add_module(f"act{i}", nn.Tanh())
    return model
