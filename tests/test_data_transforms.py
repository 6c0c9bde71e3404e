"""Image transforms: shapes, bounds, determinism, exact values; per-sample seeding helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kfac_dist.app.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    SampleKey,
    ToTensor,
    mix_seed,
    resolve_key,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pil(height: int, width: int, seed: int = 0) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(data, "RGB")


@pytest.mark.parametrize("size", [224, (32, 48)])
def test_random_resized_crop_output_size_pil_and_tensor(size):
    crop = RandomResizedCrop(size)
    expected = (size, size) if isinstance(size, int) else size
    out = crop(pil(60, 90), gen(0))
    assert (out.height, out.width) == expected and out.mode == "RGB"
    tensor = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    out_t = crop(tensor, gen(0))
    assert out_t.shape == (3, *expected) and out_t.dtype == torch.uint8


def test_random_resized_crop_boxes_within_bounds_and_ranges():
    crop = RandomResizedCrop(32)
    g = gen(1)
    for height, width in [(50, 80), (80, 50), (64, 64), (7, 300)]:
        for _ in range(200):
            top, left, h, w = crop.get_params(height, width, g)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            if (h, w) != (height, width) and (top, left) != ((height - h) // 2, (width - w) // 2):
                # A sampled (not fallback) box: area and aspect ratio within range, up to rounding.
                assert 0.08 * 0.8 <= h * w / (height * width) <= 1.0 + 1e-9
                assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25


def test_random_resized_crop_fallback_is_center_crop_clamped_to_ratio():
    # Whole-area crops of a 10x100 image can never fit a ratio in [3/4, 4/3]: 10 failures, then the fallback.
    crop = RandomResizedCrop(8, scale=(1.0, 1.0))
    assert crop.get_params(10, 100, gen(0)) == (0, (100 - 13) // 2, 10, 13)
    assert crop.get_params(100, 10, gen(0)) == ((100 - 13) // 2, 0, 13, 10)


def test_random_transforms_deterministic_with_generator():
    pipeline = Compose([RandomResizedCrop(24), RandomHorizontalFlip(), ToTensor()])
    image = pil(40, 50)
    a, b, c = pipeline(image, gen(3)), pipeline(image, gen(3)), pipeline(image, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Constructor generator, then global RNG.
    seeded = RandomResizedCrop(24, generator=gen(3))
    assert np.array_equal(np.asarray(seeded(image)), np.asarray(RandomResizedCrop(24)(image, gen(3))))
    torch.manual_seed(7)
    first = pipeline(image)
    torch.manual_seed(7)
    assert torch.equal(first, pipeline(image))


def test_random_resized_crop_matches_crop_then_resize():
    image = pil(40, 50)
    crop = RandomResizedCrop(16)
    top, left, h, w = crop.get_params(40, 50, gen(5))
    expected = image.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(crop(image, gen(5))), np.asarray(expected))


def test_horizontal_flip():
    image = pil(5, 7)
    tensor = ToTensor()(image)
    assert torch.equal(ToTensor()(RandomHorizontalFlip(1.0)(image)), tensor.flip(-1))
    assert torch.equal(RandomHorizontalFlip(1.0)(tensor), tensor.flip(-1))
    assert RandomHorizontalFlip(0.0)(image) is image
    flips = [not torch.equal(RandomHorizontalFlip()(tensor, gen(s)), tensor) for s in range(200)]
    assert 60 < sum(flips) < 140


def test_resize_shorter_side():
    out = Resize(32)(pil(50, 100))
    assert (out.height, out.width) == (32, 64)
    out = Resize(32)(pil(90, 45))
    assert (out.height, out.width) == (64, 32)
    assert Resize(32)(torch.rand(3, 50, 100)).shape == (3, 32, 64)


def test_center_crop_values_and_padding():
    tensor = torch.arange(3 * 10 * 12, dtype=torch.uint8).reshape(3, 10, 12)
    assert torch.equal(CenterCrop(4)(tensor), tensor[:, 3:7, 4:8])
    image = Image.fromarray(tensor.permute(1, 2, 0).numpy(), "RGB")
    assert np.array_equal(np.asarray(CenterCrop((4, 6))(image)), tensor.permute(1, 2, 0).numpy()[3:7, 3:9])
    padded = CenterCrop(14)(tensor)
    assert padded.shape == (3, 14, 14)
    assert torch.equal(padded[:, 2:12, 1:13], tensor) and padded[:, :2].sum() == 0


def test_random_crop_with_padding_is_a_window_of_the_padded_image():
    tensor = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(tensor, (4, 4, 4, 4))
    crop = RandomCrop(32, padding=4)
    offsets = set()
    for seed in range(100):
        out = crop(tensor, gen(seed))
        assert out.shape == (3, 32, 32)
        hits = [(i, j) for i in range(9) for j in range(9) if torch.equal(padded[:, i : i + 32, j : j + 32], out)]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 30
    out_pil = crop(Image.fromarray(tensor.permute(1, 2, 0).numpy()), gen(9))
    assert torch.equal(torch.from_numpy(np.array(out_pil)).permute(2, 0, 1), crop(tensor, gen(9)))
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(41, padding=4)(tensor)


def test_to_tensor():
    array = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    out = ToTensor()(array)
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert torch.equal(ToTensor()(Image.fromarray(array)), out)
    assert ToTensor()(Image.fromarray(array[:, :, 0], "L")).shape == (1, 4, 5)
    assert torch.equal(ToTensor()(torch.from_numpy(array).permute(2, 0, 1)), out)
    assert out.min() >= 0 and out.max() <= 1


def test_normalize_values():
    x = torch.rand(3, 4, 5)
    out = Normalize()(x)
    for c in range(3):
        assert torch.allclose(out[c], (x[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    assert not torch.equal(out, x)  # input untouched, output new
    white = Normalize()(torch.ones(3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]))
    with pytest.raises(ValueError, match="expected a \\(3, H, W\\) tensor"):
        Normalize()(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize((0.5,), (0.0,))


def test_mix_seed_and_sample_keys():
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)
    assert all(0 <= mix_seed(*v) < 2**63 for v in [(0,), (-1, 5), (2**70, 3)])
    index, g1 = resolve_key(SampleKey(5, 11))
    _, g2 = resolve_key(SampleKey(5, 11))
    _, g3 = resolve_key(SampleKey(6, 11))
    assert index == 5 and g1 is not None and g2 is not None and g3 is not None
    a, b, c = torch.rand(4, generator=g1), torch.rand(4, generator=g2), torch.rand(4, generator=g3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert resolve_key(np.int64(3)) == (3, None)
