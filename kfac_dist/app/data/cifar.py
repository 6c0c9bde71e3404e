"""CIFAR-10 from its standard "python version" batches on disk.

Layout: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (what the official
``cifar-10-python.tar.gz`` extracts to); ``root`` may also be that folder itself. Each batch file is a pickled dict
(written by Python 2, so it is read with ``encoding="bytes"`` and its keys are byte strings) with ``b"data"``, a
(N, 3072) uint8 array of N images as 1024 red, 1024 green then 1024 blue values in row-major 32x32 order, and
``b"labels"``, N ints in 0-9. ``batches.meta`` holds ``b"label_names"``. Python-3 pickles with ``str`` keys are
accepted too.

Safety: the files are read with an unpickler that only resolves the numpy names needed to rebuild arrays, so a
tampered file cannot run arbitrary code.

Augmentation: training uses a random 32x32 crop of the image zero-padded by 4 pixels + horizontal flip, then
normalisation with the CIFAR-10 training set's per-channel mean and std; test images are only normalised.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kfac_dist.app.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    SampleKey,
    ToTensor,
    Transform,
    resolve_key,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10Dataset",
    "build_cifar10",
    "cifar10_test_transform",
    "cifar10_train_transform",
    "find_cifar10_dir",
    "read_batch",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild numpy arrays (old and new module names)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as file:
            content = _ArrayUnpickler(file, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"cannot read CIFAR-10 batch file {path}: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _field(content: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(map(repr, content))})")


def find_cifar10_dir(root: str | os.PathLike[str]) -> Path:
    """The folder holding the batch files: ``root/cifar-10-batches-py`` if it exists, else ``root`` itself.

    Raises:
        FileNotFoundError: If ``root`` is missing, or it has no ``cifar-10-batches-py`` folder and holds none of the
            CIFAR-10 files itself.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root not found: {root}")
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if any((root / name).is_file() for name in (META_FILE, *TRAIN_FILES, *TEST_FILES)):
        return root
    raise FileNotFoundError(
        f"no CIFAR-10 python batches in {root}: expected {root / FOLDER}/ (or {', '.join(TRAIN_FILES[:1])}..., "
        f"{TEST_FILES[0]}, {META_FILE} directly in {root})"
    )


def read_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file.

    Returns:
        ``(images, labels)``: (N, 3, 32, 32) uint8 and (N,) int64.

    Raises:
        FileNotFoundError: If the file is missing (the message names it).
        ValueError: If it is not a CIFAR-10 batch (wrong keys, shapes or label range).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
    content = _load_pickle(path)
    data = np.asarray(_field(content, "data", path))
    labels = np.asarray(_field(content, "labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f"{path}: expected {data.shape[0]} labels in 0-9, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def read_label_names(directory: Path) -> list[str]:
    """The 10 class names from ``directory/batches.meta``."""
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 meta file not found: {path}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(_load_pickle(path), "label_names", path)]
    if len(names) != 10:
        raise ValueError(f"{path}: expected 10 label names, got {len(names)}")
    return names


class CIFAR10Dataset(Dataset[tuple[Any, int]]):
    """The CIFAR-10 training (50,000 images) or test (10,000) split, held in memory as uint8.

    Items are ``(transform(image), label)`` where ``image`` is a (3, 32, 32) uint8 tensor.

    Args:
        root: The folder holding ``cifar-10-batches-py/``, or that folder itself.
        train: The training split (``data_batch_1..5``) or the test split (``test_batch``).
        transform: Applied as ``transform(image, generator)``; ``None`` returns the uint8 tensor.

    Raises:
        FileNotFoundError: If the folder or a file of the split (or ``batches.meta``) is missing; the message
            names the path.
        ValueError: If a file is not a CIFAR-10 batch.
    """

    accepts_sample_keys = True

    def __init__(self, root: str | os.PathLike[str], train: bool = True, transform: Transform | None = None) -> None:
        self.directory = find_cifar10_dir(root)
        self.train = train
        self.transform = transform
        files = [self.directory / name for name in (TRAIN_FILES if train else TEST_FILES)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 batch file(s) not found: {', '.join(missing)}")
        self.classes = read_label_names(self.directory)
        batches = [read_batch(f) for f in files]
        self.data: Tensor = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        self.targets: Tensor = torch.from_numpy(np.concatenate([b[1] for b in batches]))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: SampleKey | SupportsIndex) -> tuple[Any, int]:
        index, generator = resolve_key(key)
        image: Any = self.data[index]
        if self.transform is not None:
            image = self.transform(image, generator)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CIFAR10Dataset({str(self.directory)!r}, {split}, {len(self)} images)"


def cifar10_train_transform() -> Compose:
    """Random 32x32 crop with 4-pixel zero padding, horizontal flip, CIFAR-10 normalisation."""
    return Compose(
        [RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )


def cifar10_test_transform() -> Compose:
    """CIFAR-10 normalisation only."""
    return Compose([ToTensor(), Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def build_cifar10(root: str | os.PathLike[str], augment: bool = True) -> tuple[CIFAR10Dataset, CIFAR10Dataset, int]:
    """The CIFAR-10 training and test splits under ``root``.

    Args:
        root: The folder holding ``cifar-10-batches-py/``, or that folder itself.
        augment: Random crop + flip on the training split (otherwise it is only normalised).

    Returns:
        ``(train, test, 10)``.
    """
    train_transform = cifar10_train_transform() if augment else cifar10_test_transform()
    train = CIFAR10Dataset(root, train=True, transform=train_transform)
    test = CIFAR10Dataset(root, train=False, transform=cifar10_test_transform())
    return train, test, len(train.classes)
