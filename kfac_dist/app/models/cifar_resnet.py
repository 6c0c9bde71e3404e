"""CIFAR ResNets of He et al. 2016 (Sec. 4.2): ResNet-20/32/56 (depth 6n+2) with option A shortcuts.

Layout: 3x3 conv (16 channels) + BN + ReLU, three stages of ``n`` basic blocks with 16, 32 and 64 channels
(the first block of stages 2 and 3 has stride 2), global average pool, fc. Shortcuts are *option A* of the
paper: the identity, and where the shape changes, the input subsampled with stride 2 and zero-padded in
channels, so shortcuts have no parameters. With 10 classes ResNet-20 has 269,722 parameters (the paper's
"0.27M"): the stem conv 432 + BN 32, stage 1 (16->16, 3 blocks) 14,016, stage 2 (first block 16->32, then 2
blocks 32->32) 51,072, stage 3 (first block 32->64, then 2 blocks 64->64) 203,520, fc 650 (BN weights and
biases included).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CifarBasicBlock", "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with a parameter-free (option A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            in_planes: Input channels.
            planes: Output channels (``>= in_planes``).
            stride: Stride of the first convolution and of the shortcut's subsampling.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.pad = planes - in_planes

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self._shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, He et al. 2016, option A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        """Build the network.

        Args:
            depth: Total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
            num_classes: Number of output logits.
            in_channels: Channels of the input image.

        Raises:
            ValueError: If ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.
        """
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. 20, 32, 56), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = [CifarBasicBlock(in_planes, planes, stride)]
        stage += [CifarBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def cifar_resnet20(**kwargs: object) -> CifarResNet:
    """CIFAR ResNet-20 (269,722 parameters with 10 classes); kwargs go to :class:`CifarResNet`."""
    return CifarResNet(20, **kwargs)  # type: ignore[arg-type]


def cifar_resnet32(**kwargs: object) -> CifarResNet:
    """CIFAR ResNet-32; kwargs go to :class:`CifarResNet`."""
    return CifarResNet(32, **kwargs)  # type: ignore[arg-type]


def cifar_resnet56(**kwargs: object) -> CifarResNet:
    """CIFAR ResNet-56; kwargs go to :class:`CifarResNet`."""
    return CifarResNet(56, **kwargs)  # type: ignore[arg-type]
