"""Image transforms (pure Pillow + torch) and per-sample seeding for reproducible augmentation.

Every transform is called as ``transform(img, generator=None)``. The random ones draw from, in this order: the
``generator`` passed to the call, the ``generator`` given to their constructor, or torch's global RNG (which the
data loader seeds per worker, see :mod:`kfac_dist.app.data.loaders`). Images are Pillow images or uint8/float CHW
tensors; :class:`ToTensor` turns either into a float CHW tensor in [0, 1].

Per-sample seeding: a sampler may hand a dataset a :class:`SampleKey` ``(index, seed)`` instead of a plain index;
datasets that accept keys (``accepts_sample_keys = True``) then augment sample ``index`` with a generator seeded
from ``mix_seed(seed, index)`` (:func:`resolve_key`). The augmentation of a sample is then a pure function of
(seed, epoch, index): the same whatever the rank, world size, number of workers or history of the run.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, SupportsIndex

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CenterCrop",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "SampleKey",
    "ToTensor",
    "Transform",
    "mix_seed",
    "resolve_key",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MASK64 = (1 << 64) - 1

ImageLike = Image.Image | Tensor


class Transform(Protocol):
    """A callable ``transform(img, generator=None)``."""

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        """Transform ``img``; random transforms draw from ``generator`` when one is given."""


@dataclass(frozen=True, slots=True)
class SampleKey:
    """A sampler's request for sample ``index``, augmented with randomness seeded by ``(seed, index)``."""

    index: int
    seed: int


def mix_seed(*values: int) -> int:
    """Hash integers (any sign or size, order matters) into a seed in ``[0, 2**63)`` with SplitMix64 steps."""
    state = 0
    for value in values:
        z = ((state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def resolve_key(key: SampleKey | SupportsIndex) -> tuple[int, torch.Generator | None]:
    """Split a dataset key into the sample index and the generator for its augmentation.

    Returns:
        ``(index, generator)``: for a :class:`SampleKey`, a fresh generator seeded with ``mix_seed(seed, index)``;
        for a plain index, ``None`` (random transforms then use their own or the global RNG).
    """
    if isinstance(key, SampleKey):
        generator = torch.Generator()
        generator.manual_seed(mix_seed(key.seed, key.index))
        return key.index, generator
    return operator.index(key), None


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width); got {size!r}")
    return int(size[0]), int(size[1])


def _hw(img: ImageLike) -> tuple[int, int]:
    if isinstance(img, Image.Image):
        return img.height, img.width
    if isinstance(img, Tensor) and img.ndim >= 2:
        return int(img.shape[-2]), int(img.shape[-1])
    raise TypeError(f"expected a PIL image or a (..., H, W) tensor; got {type(img).__name__}")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _crop(img: ImageLike, top: int, left: int, height: int, width: int) -> ImageLike:
    """Crop a box that may extend past the image; the part outside is filled with zeros."""
    if isinstance(img, Image.Image):
        return img.crop((left, top, left + width, top + height))
    h, w = _hw(img)
    pads = (max(0, -left), max(0, left + width - w), max(0, -top), max(0, top + height - h))
    if any(pads):
        img = F.pad(img, pads)
        top, left = top + pads[2], left + pads[0]
    return img[..., top : top + height, left : left + width]


def _resize(img: ImageLike, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> ImageLike:
    """Crop ``box`` = (top, left, h, w) if given, then resize (bilinear, antialiased) to ``size`` = (height, width)."""
    img = img if box is None else _crop(img, *box)
    if isinstance(img, Image.Image):
        return img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    tensor = img
    batch = tensor.reshape(-1, *tensor.shape[-3:]) if tensor.ndim >= 3 else tensor[None, None]
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    if tensor.dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    return out.reshape(*tensor.shape[:-2], *size)


class Compose:
    """Apply ``transforms`` in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        """Apply every transform."""
        for transform in self.transforms:
            img = transform(img, generator)
        return img

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomResizedCrop:
    """Inception-style crop: a random area fraction and aspect ratio, resized (bilinear) to ``size``.

    Up to 10 tries draw an area fraction uniformly from ``scale`` and a log-uniform aspect ratio (width / height)
    from ``ratio``; the first box that fits inside the image is used at a uniformly random position. If none
    fits, the fallback is a center crop of the whole image clamped to ``ratio`` (as in torchvision).

    Args:
        size: Output size, an int (square) or (height, width).
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).
        generator: Default RNG (else torch's global RNG), used when the call passes none.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ) -> None:
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be increasing positive ranges; got {scale}, {ratio}")
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.generator = generator

    def get_params(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """The crop box ``(top, left, h, w)`` for a ``height`` x ``width`` image."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> ImageLike:
        """Crop a random box and resize it to ``size``."""
        box = self.get_params(*_hw(img), generator if generator is not None else self.generator)
        return _resize(img, self.size, box)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomCrop:
    """Crop a random ``size`` box after zero-padding each border by ``padding`` pixels (the CIFAR augmentation).

    Args:
        size: Output size, an int (square) or (height, width); at most the padded image's size.
        padding: Zero padding added on every side before cropping.
        generator: Default RNG (else torch's global RNG), used when the call passes none.
    """

    def __init__(self, size: int | Sequence[int], padding: int = 0, generator: torch.Generator | None = None) -> None:
        self.size = _pair(size)
        self.padding = padding
        self.generator = generator

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> ImageLike:
        """Pad, then crop at a uniformly random position."""
        g = generator if generator is not None else self.generator
        (h, w), (th, tw), p = _hw(img), self.size, self.padding
        if th > h + 2 * p or tw > w + 2 * p:
            raise ValueError(f"crop size {self.size} is larger than the padded image ({h + 2 * p}, {w + 2 * p})")
        return _crop(img, _randint(0, h + 2 * p - th, g) - p, _randint(0, w + 2 * p - tw, g) - p, th, tw)


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``.

    Args:
        p: Probability of a flip.
        generator: Default RNG (else torch's global RNG), used when the call passes none.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> ImageLike:
        """Flip or pass through (one draw from the RNG either way)."""
        if float(torch.rand((), generator=generator if generator is not None else self.generator)) >= self.p:
            return img
        if isinstance(img, Image.Image):
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img.flip(-1)


class Resize:
    """Resize (bilinear, antialiased) so that the shorter side is ``size``, keeping the aspect ratio.

    The longer side becomes ``int(size * long / short)``, as in torchvision.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> ImageLike:
        """Resize ``img``."""
        h, w = _hw(img)
        if h <= w:
            return _resize(img, (self.size, int(self.size * w / h)))
        return _resize(img, (int(self.size * h / w), self.size))


class CenterCrop:
    """Crop the central ``size`` box (an image smaller than that is zero-padded around, as in torchvision)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> ImageLike:
        """Crop ``img``."""
        (h, w), (th, tw) = _hw(img), self.size
        return _crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


class ToTensor:
    """PIL image or uint8 HWC array -> float32 CHW tensor in [0, 1]; a uint8 tensor is taken as CHW already.

    Grayscale images (``mode "L"``, 2-D arrays) get one channel. Float tensors pass through unchanged.
    """

    def __call__(self, img: Image.Image | np.ndarray | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Convert ``img``."""
        if isinstance(img, Tensor):
            if img.is_floating_point():
                return img
            if img.dtype != torch.uint8:
                raise TypeError(f"expected a uint8 or float tensor; got {img.dtype}")
            return img.float().div_(255.0)
        array = np.array(img, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"expected an HWC image; got an array of shape {array.shape}")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


class Normalize:
    """Standardise each channel of a float CHW tensor: ``(x - mean) / std`` (not in place).

    Args:
        mean: Per-channel means.
        std: Per-channel standard deviations (positive).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std must have the same length and std must be positive; got {mean}, {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalise ``img`` (C, H, W) with C equal to the number of means."""
        if img.ndim != 3 or img.shape[0] != self.mean.shape[0]:
            raise ValueError(f"expected a ({self.mean.shape[0]}, H, W) tensor; got shape {tuple(img.shape)}")
        return (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
