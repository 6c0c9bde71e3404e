"""Test helpers: CIFAR-10 python batches in the real on-disk format, and the synthetic-ImageFolder script."""

from __future__ import annotations

import importlib.util
import pickle
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_LABEL_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 as Python 2's cPickle wrote the CIFAR-10 files.

    Python 2 ``str`` values (every key, label name and the arrays' raw bytes) are BINSTRING / SHORT_BINSTRING
    opcodes, which Python 3 reads back as ``bytes`` with ``encoding="bytes"``; numpy globals carry their numpy-1
    module names (``numpy.core.multiarray._reconstruct``).
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj: Any, path: Path) -> None:
    with open(path, "wb") as file:
        Py2Pickler(file, protocol=2).dump(obj)


def write_fake_cifar10(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, Any]:
    """Write ``root/cifar-10-batches-py`` with random images in the real files' format.

    The ``n_train`` training images are split over ``data_batch_1..5`` as evenly as possible.

    Returns:
        ``{"dir": folder, "train": (data, labels), "test": (data, labels)}`` with ``data`` (N, 3072) uint8 and
        ``labels`` a list of ints, as written.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"dir": folder}
    for split, count in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        written[split] = (data, labels)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        bounds = np.linspace(0, count, len(names) + 1).round().astype(int)
        for i, name in enumerate(names):
            lo, hi = bounds[i], bounds[i + 1]
            batch = {
                b"batch_label": f"{'training' if split == 'train' else 'testing'} batch {i + 1} of {len(names)}",
                b"labels": labels[lo:hi],
                b"data": data[lo:hi],
                b"filenames": [f"fake_{split}_{j}.png".encode() for j in range(lo, hi)],
            }
            py2_pickle(batch, folder / name)
    py2_pickle(
        {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_LABEL_NAMES, b"num_vis": 3072}, folder / "batches.meta"
    )
    return written


def load_synthetic_script() -> ModuleType:
    """Import ``scripts/make_synthetic_imagefolder.py`` as a module."""
    path = ROOT / "scripts" / "make_synthetic_imagefolder.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_imagefolder", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
