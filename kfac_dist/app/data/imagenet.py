"""ImageNet in ImageFolder layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

The layout and indexing are torchvision's ``ImageFolder``: the classes are the sorted names of the split's
sub-folders (class ``i`` is the ``i``-th name), and the samples are the image files found (recursively, following
links) under each class folder, in sorted order. Image files are recognised by extension, case-insensitively
(:data:`IMG_EXTENSIONS`). Hidden entries (names starting with ``.``: macOS ``._x.JPEG`` files, ``.ipynb_checkpoints``
folders) are skipped, a deliberate difference from torchvision. Images are decoded with Pillow and converted to RGB.

Errors name the path at fault: a missing root or split folder, a split folder without class folders and a class
folder without images all raise ``FileNotFoundError``. An empty class folder is an error rather than a warning: it
almost always means an incomplete extraction or copy, and its class would silently get no examples.
:func:`build_imagenet` also requires ``val`` to have exactly the classes of ``train``, since labels are indices.

Augmentation: training uses an Inception-style random resized crop + horizontal flip + ImageNet normalisation;
validation resizes the shorter side to ``val_resize`` and takes the center ``image_size`` crop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from kfac_dist.app.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    SampleKey,
    ToTensor,
    Transform,
    resolve_key,
)

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "build_imagenet",
    "find_classes",
    "imagenet_train_transform",
    "imagenet_val_transform",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(directory: str | os.PathLike[str]) -> list[str]:
    """The sorted names of the sub-folders of ``directory``.

    Raises:
        FileNotFoundError: If ``directory`` is not a folder or holds no sub-folders; the message names it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data folder not found: {directory}")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {directory} (expected {directory}/<class>/<image files>)")
    return classes


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan_class(directory: Path, class_name: str) -> list[str]:
    """Image files under ``directory/class_name``, as paths relative to ``directory``, in torchvision's order."""
    found: list[str] = []
    for folder, _, names in sorted(os.walk(directory / class_name, followlinks=True)):
        relative = os.path.relpath(folder, directory)
        found.extend(os.path.join(relative, name) for name in sorted(names) if _is_image(name))
    return found


class ImageFolderDataset(Dataset[tuple[Any, int]]):
    """One split of an ImageFolder tree: items are ``(transform(image), class_index)``.

    The file list is kept in numpy arrays (not a list of Python objects), so that forked data-loader workers
    share it without copy-on-access growth.

    Args:
        root: The data set root, holding one folder per split.
        split: The split's folder name under ``root`` (e.g. ``"train"`` or ``"val"``).
        transform: Applied to the RGB Pillow image as ``transform(image, generator)``; ``None`` returns the image.

    Raises:
        FileNotFoundError: If ``root`` or ``root/split`` is missing, ``root/split`` has no class folders, or a
            class folder has no images; the message names the path.
    """

    accepts_sample_keys = True

    def __init__(self, root: str | os.PathLike[str], split: str = "train", transform: Transform | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.directory = self.root / split
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"data set root not found: {self.root}")
        if not self.directory.is_dir():
            raise FileNotFoundError(
                f"{split!r} split not found: {self.directory} (expected {self.root}/{split}/<class>/)"
            )
        self.classes = find_classes(self.directory)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        paths: list[bytes] = []
        targets: list[int] = []
        empty = []
        for index, name in enumerate(self.classes):
            files = _scan_class(self.directory, name)
            if not files:
                empty.append(str(self.directory / name))
            paths.extend(os.fsencode(f) for f in files)
            targets.extend([index] * len(files))
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            extensions = "/".join(IMG_EXTENSIONS)
            raise FileNotFoundError(f"class folder(s) without images ({extensions}): {shown}")
        self._paths = np.array(paths, dtype=np.bytes_)
        self.targets = np.array(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> Path:
        """The file of sample ``index``."""
        return self.directory / os.fsdecode(bytes(self._paths[index]))

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, class_index)`` for every sample, as torchvision's ``ImageFolder.samples`` (built on demand)."""
        return [(str(self.path(i)), int(t)) for i, t in enumerate(self.targets)]

    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB Pillow image.

        Raises:
            OSError: If the file cannot be read or decoded (unreadable, truncated, corrupt, a decompression bomb);
                the message names it.
        """
        path = self.path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # Pillow raises all of these
            raise OSError(f"cannot decode image {path}: {error}") from error

    def __getitem__(self, key: SampleKey | SupportsIndex) -> tuple[Any, int]:
        index, generator = resolve_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples in {self.directory}")
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image, generator)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.directory)!r}, {len(self)} images, {len(self.classes)} classes)"


def imagenet_train_transform(image_size: int = 224) -> Compose:
    """Random resized crop to ``image_size`` (scale 0.08-1, ratio 3/4-4/3), horizontal flip, normalise."""
    return Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), ToTensor(), Normalize()])


def imagenet_val_transform(image_size: int = 224, resize: int | None = None) -> Compose:
    """Resize the shorter side to ``resize`` (default ``round(image_size * 256 / 224)``), center crop, normalise."""
    resize = round(image_size * 256 / 224) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"val resize {resize} is smaller than the crop size {image_size}")
    return Compose([Resize(resize), CenterCrop(image_size), ToTensor(), Normalize()])


def build_imagenet(
    root: str | os.PathLike[str], image_size: int = 224, val_resize: int | None = None
) -> tuple[ImageFolderDataset, ImageFolderDataset, int]:
    """The ImageNet training and validation splits under ``root`` (``root/train``, ``root/val``).

    Args:
        root: The folder holding ``train/`` and ``val/``.
        image_size: Side of the square training crops and validation center crops (224 for ImageNet).
        val_resize: Shorter side before the validation center crop; default ``round(image_size * 256 / 224)``
            (256 for 224), so that a low-resolution run keeps ImageNet's crop fraction.

    Returns:
        ``(train, val, num_classes)``.

    Raises:
        FileNotFoundError: See :class:`ImageFolderDataset`.
        ValueError: If ``val`` does not have exactly the classes of ``train``.
    """
    train = ImageFolderDataset(root, "train", imagenet_train_transform(image_size))
    val = ImageFolderDataset(root, "val", imagenet_val_transform(image_size, val_resize))
    if val.classes != train.classes:
        missing = sorted(set(train.classes) - set(val.classes))[:5]
        extra = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(
            f"{val.directory} and {train.directory} must have the same class folders "
            f"({len(val.classes)} vs {len(train.classes)}; missing in val: {missing}, not in train: {extra})"
        )
    return train, val, len(train.classes)
