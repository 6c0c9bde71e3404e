"""The synthetic ImageFolder script, and smoke runs of ResNet-50 (+ K-FAC) on its images through the loaders."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from data_fakes import ROOT, load_synthetic_script
from PIL import Image
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.data.imagenet import build_imagenet
from kfac_dist.app.data.loaders import build_loaders
from kfac_dist.app.models import build_model

synthetic = load_synthetic_script()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return synthetic.write_synthetic_imagefolder(root, classes=4, train_per_class=8, val_per_class=2, size=64)


def test_tree_layout_and_jpegs(tree):
    for split, per_class in (("train", 8), ("val", 2)):
        assert sorted(p.name for p in (tree / split).iterdir()) == [f"class_{c:03d}" for c in range(4)]
        for c in range(4):
            files = sorted((tree / split / f"class_{c:03d}").iterdir())
            assert [f.name for f in files] == [f"class_{c:03d}_{i:05d}.JPEG" for i in range(per_class)]
            with Image.open(files[0]) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_deterministic_and_cli(tree, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, str(ROOT / "scripts" / "make_synthetic_imagefolder.py"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "wrote 40 JPEGs of 64x64 in 4 classes" in result.stdout
    files = sorted(p.relative_to(tree) for p in tree.rglob("*.JPEG"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.JPEG")) and len(files) == 40
    assert all((tree / f).read_bytes() == (out / f).read_bytes() for f in files)
    other = synthetic.write_synthetic_imagefolder(tmp_path / "seed1", classes=4, train_per_class=8, seed=1)
    assert (other / files[0]).read_bytes() != (tree / files[0]).read_bytes()
    with pytest.raises(ValueError, match="classes >= 1"):
        synthetic.write_synthetic_imagefolder(tmp_path / "bad", classes=0)


def test_classes_are_learnable_from_colour(tmp_path):
    root = synthetic.write_synthetic_imagefolder(tmp_path, classes=4, train_per_class=10, val_per_class=10, size=32)

    def brightest_colours(split):  # per-channel maximum: the shape's colour, whatever its size
        features, labels = [], []
        for c in range(4):
            for path in sorted((root / split / f"class_{c:03d}").iterdir()):
                with Image.open(path) as image:
                    features.append(np.asarray(image, dtype=np.float64).reshape(-1, 3).max(axis=0))
                labels.append(c)
        return np.array(features), np.array(labels)

    train_x, train_y = brightest_colours("train")
    val_x, val_y = brightest_colours("val")
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(4)])
    predictions = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predictions == val_y).mean() >= 0.9  # nearest class centroid


def test_resnet50_forward_backward_through_the_loader(tree):
    torch.manual_seed(0)
    train_ds, val_ds, num_classes = build_imagenet(tree, image_size=64)
    train, val, sampler = build_loaders(train_ds, val_ds, batch_size=2, seed=0)
    sampler.set_epoch(0)
    images, labels = next(iter(train))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32 and labels.dtype == torch.int64
    model = build_model("resnet50", num_classes=num_classes)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    val_images, _ = next(iter(val))
    assert val_images.shape == (2, 3, 64, 64)


def test_resnet50_kfac_steps_on_synthetic_imagefolder(tree):
    """ResNet-50's depth and block structure at 1/4 width (factor sides <= 1152, fast on CPU), 3 K-FAC steps."""
    torch.manual_seed(0)
    train_ds, val_ds, num_classes = build_imagenet(tree, image_size=32)
    train, _, sampler = build_loaders(train_ds, val_ds, batch_size=8, seed=0)
    model = build_model("resnet50", num_classes=num_classes, width_multiplier=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, lr=0.05, damping=0.1, inv_update_steps=10)
    fc = model.fc.weight
    before = [p.detach().clone() for p in model.parameters()]
    sampler.set_epoch(0)
    steps = 0
    for images, labels in train:
        assert images.shape == (8, 3, 32, 32)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        raw = fc.grad.clone()
        pre.step()
        assert not torch.allclose(fc.grad, raw) and torch.isfinite(fc.grad).all()  # preconditioned
        optimizer.step()
        assert torch.isfinite(loss)
        steps += 1
        if steps == 3:
            break
    assert steps == 3
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
