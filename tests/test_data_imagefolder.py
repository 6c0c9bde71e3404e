"""ImageNet ImageFolder data set: classes, counts, order, decoding, transforms, errors that name the path."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from data_fakes import load_synthetic_script
from PIL import Image

from kfac_dist.app.data.imagenet import ImageFolderDataset, build_imagenet, imagenet_val_transform
from kfac_dist.app.data.transforms import SampleKey

synthetic = load_synthetic_script()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return synthetic.write_synthetic_imagefolder(root, classes=3, train_per_class=4, val_per_class=2, size=40)


def test_classes_counts_and_order(tree):
    train = ImageFolderDataset(tree, "train")
    val = ImageFolderDataset(tree, "val")
    assert train.classes == ["class_000", "class_001", "class_002"]
    assert train.class_to_idx == {"class_000": 0, "class_001": 1, "class_002": 2}
    assert len(train) == 12 and len(val) == 6
    assert np.bincount(train.targets).tolist() == [4, 4, 4]
    paths = [p for p, _ in train.samples]
    assert paths == sorted(paths)
    assert train.samples[5] == (str(tree / "train" / "class_001" / "class_001_00001.JPEG"), 1)


def test_items_are_rgb_images_and_transformed_tensors(tree):
    image, label = ImageFolderDataset(tree, "val")[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (40, 40) and label == 1
    train, val, num_classes = build_imagenet(tree, image_size=32)
    assert num_classes == 3
    x, y = train[SampleKey(0, 1)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert torch.equal(x, train[SampleKey(0, 1)][0]) and not torch.equal(x, train[SampleKey(0, 2)][0])
    v, _ = val[0]
    assert torch.equal(v, imagenet_val_transform(32)(val.load(0)))  # resize to round(32 * 256 / 224) = 37
    assert torch.equal(v, val[0][0])


def test_scan_rules(tmp_path):
    cls = tmp_path / "train" / "b_class"
    (cls / "nested").mkdir(parents=True)
    Image.fromarray(np.full((6, 8), 128, np.uint8), "L").save(cls / "gray.png")
    Image.fromarray(np.zeros((6, 8, 4), np.uint8), "RGBA").save(cls / "nested" / "alpha.PNG")
    (cls / "notes.txt").write_text("not an image")
    (cls / "._hidden.JPEG").write_bytes(b"AppleDouble")
    (tmp_path / "train" / "a_class").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "a_class" / "x.jpeg")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    ds = ImageFolderDataset(tmp_path, "train")
    assert ds.classes == ["a_class", "b_class"]
    assert [(p.split("train/")[1], t) for p, t in ds.samples] == [
        ("a_class/x.jpeg", 0),
        ("b_class/gray.png", 1),
        ("b_class/nested/alpha.PNG", 1),
    ]
    assert all(ds[i][0].mode == "RGB" for i in range(3))
    assert np.asarray(ds[1][0])[0, 0].tolist() == [128, 128, 128]


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data set root not found: {re.escape(str(missing))}"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match=f"'train' split not found: {re.escape(str(tmp_path / 'train'))}"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no class folders in {re.escape(str(tmp_path / 'train'))}"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "train" / "full").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "full" / "a.jpg")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"without images .*: {re.escape(str(tmp_path / 'train' / 'empty'))}$"):
        ImageFolderDataset(tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "train" / "c" / "broken.JPEG").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(
        OSError, match=f"cannot decode image {re.escape(str(tmp_path / 'train' / 'c' / 'broken.JPEG'))}"
    ):
        ds[0]
    with pytest.raises(IndexError, match="out of range"):
        ds[1]


def test_val_must_have_the_train_classes(tmp_path):
    synthetic.write_synthetic_imagefolder(tmp_path, classes=2, train_per_class=1, val_per_class=1, size=8)
    extra = tmp_path / "val" / "class_009"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.JPEG")
    with pytest.raises(ValueError, match="not in train: \\['class_009'\\]"):
        build_imagenet(tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match=f"'val' split not found: {re.escape(str(tmp_path / 'nope' / 'val'))}"):
        (tmp_path / "nope" / "train" / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "nope" / "train" / "a" / "x.JPEG")
        build_imagenet(tmp_path / "nope", image_size=8)
