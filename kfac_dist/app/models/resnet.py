"""ImageNet ResNets (He et al. 2016) in torchvision's v1.5 layout.

The module names match torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layerK.0.downsample.0``,
``fc``), so torchvision state dicts load unchanged. As in torchvision (ResNet v1.5), a bottleneck block puts
its stride on the 3x3 convolution (``conv2``), not on the first 1x1. With 1000 classes ResNet-50 has
25,557,032 parameters and ResNet-18 11,689,512.

``width_multiplier`` scales every channel count (stem and the four stages, 64/128/256/512 times the block
expansion) so that e.g. ``width_multiplier=0.125`` gives a 1/8-width network with the same depth and layer
structure, a cheap CPU proxy whose K-FAC factors are small.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        """Build the block.

        Args:
            inplanes: Input channels.
            planes: Output channels.
            stride: Stride of the first convolution.
            downsample: Projection applied to the shortcut, or None for the identity.
        """
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convolutions with a residual connection (ResNet-50/101/152)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        """Build the block.

        Args:
            inplanes: Input channels.
            planes: Bottleneck width; the block outputs ``planes * 4`` channels.
            stride: Stride of the 3x3 convolution.
            downsample: Projection applied to the shortcut, or None for the identity.
        """
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet for ImageNet-style inputs (7x7/2 stem, 3x3/2 max pool, four stages, global average pool, fc)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        width_multiplier: float = 1.0,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        """Build the network.

        Args:
            block: Block type, ``BasicBlock`` or ``Bottleneck``.
            layers: Number of blocks in each of the four stages.
            num_classes: Number of output logits.
            width_multiplier: Scale of every channel count (1.0 is the standard network); must be > 0.
            in_channels: Channels of the input image.
            zero_init_residual: Zero the last BatchNorm weight of each block (torchvision's option).

        Raises:
            ValueError: If ``width_multiplier``, ``num_classes`` or ``in_channels`` is not positive.
        """
        super().__init__()
        if not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        widths = [max(1, round(w * width_multiplier)) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def resnet18(**kwargs: object) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes); kwargs go to :class:`ResNet`."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)  # type: ignore[arg-type]


def resnet34(**kwargs: object) -> ResNet:
    """ResNet-34; kwargs go to :class:`ResNet`."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)  # type: ignore[arg-type]


def resnet50(**kwargs: object) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters with 1000 classes); kwargs go to :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)  # type: ignore[arg-type]


def resnet101(**kwargs: object) -> ResNet:
    """ResNet-101 v1.5; kwargs go to :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)  # type: ignore[arg-type]


def resnet152(**kwargs: object) -> ResNet:
    """ResNet-152 v1.5; kwargs go to :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)  # type: ignore[arg-type]
