"""CIFAR-10 python batches: a round trip through files in the real format, transforms, and clear errors."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from data_fakes import write_fake_cifar10

from kfac_dist.app.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10Dataset, build_cifar10, read_batch
from kfac_dist.app.data.transforms import SampleKey


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train=53, n_test=17, seed=3)


def test_files_have_the_python2_format(fake):
    folder = fake["dir"]
    assert sorted(os.listdir(folder)) == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    raw = (folder / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"U\x04data" in raw and b"cnumpy.core.multiarray\n_reconstruct" in raw
    with open(folder / "data_batch_1", "rb") as file:  # what the CIFAR web page says to do
        batch = pickle.load(file, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}


@pytest.mark.parametrize("via_folder", [False, True])
def test_round_trip_labels_shapes_pixels(fake, via_folder):
    root = fake["dir"] if via_folder else fake["dir"].parent
    train, test = CIFAR10Dataset(root, train=True), CIFAR10Dataset(root, train=False)
    assert len(train) == 53 and len(test) == 17
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
    for ds, (data, labels) in ((train, fake["train"]), (test, fake["test"])):
        assert ds.data.shape == (len(labels), 3, 32, 32) and ds.data.dtype == torch.uint8
        assert ds.targets.tolist() == labels
        assert np.array_equal(ds.data.reshape(len(labels), -1).numpy(), data)
        image, label = ds[4]
        assert label == labels[4]
        # Channel-major layout: the first 1024 values are the red plane, row by row.
        assert np.array_equal(image[0].numpy(), data[4, :1024].reshape(32, 32))
        assert np.array_equal(image[2].numpy(), data[4, 2048:].reshape(32, 32))


def test_transforms(fake):
    train, test, num_classes = build_cifar10(fake["dir"].parent)
    assert num_classes == 10
    x, y = test[2]
    raw = torch.from_numpy(fake["test"][0][2].reshape(3, 32, 32)).float() / 255
    expected = (raw - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(x, expected) and y == fake["test"][1][2]
    a = train[SampleKey(0, 5)][0]
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, train[SampleKey(0, 5)][0])
    assert any(not torch.equal(a, train[SampleKey(0, s)][0]) for s in range(6, 10))


def test_python3_pickles_with_str_keys_load(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for protocol in (4, 5):
        path = tmp_path / f"batch_{protocol}"
        path.write_bytes(pickle.dumps({"data": data, "labels": [3, 9]}, protocol=protocol))
        images, labels = read_batch(path)
        assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 9]
        assert np.array_equal(images.reshape(2, -1), data)


def test_missing_files_are_named(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 root not found: {re.escape(str(missing))}"):
        CIFAR10Dataset(missing)
    with pytest.raises(FileNotFoundError, match=f"no CIFAR-10 python batches in {re.escape(str(tmp_path))}"):
        CIFAR10Dataset(tmp_path)
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=5)["dir"]
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=f"not found: {re.escape(str(folder / 'data_batch_3'))}$"):
        CIFAR10Dataset(tmp_path, train=True)
    assert len(CIFAR10Dataset(tmp_path, train=False)) == 5
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=f"meta file not found: {re.escape(str(folder / 'batches.meta'))}"):
        CIFAR10Dataset(tmp_path, train=False)


def test_bad_contents_are_errors(tmp_path):
    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=f"{re.escape(str(wrong_shape))}: expected uint8 data of shape"):
        read_batch(wrong_shape)
    no_labels = tmp_path / "cifar100_style"
    no_labels.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}))
    with pytest.raises(ValueError, match="no 'labels' entry"):
        read_batch(no_labels)
    not_pickle = tmp_path / "garbage"
    not_pickle.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=f"cannot read CIFAR-10 batch file {re.escape(str(not_pickle))}"):
        read_batch(not_pickle)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_untrusted_globals_are_refused(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match="is not allowed in a CIFAR batch file"):
        read_batch(path)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
