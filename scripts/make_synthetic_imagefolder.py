"""Write a tiny ImageNet-layout tree of JPEGs for tests and smoke runs.

Layout (as ImageNet's ImageFolder tree): ``OUT/train/class_000/class_000_00000.JPEG``, ...,
``OUT/val/class_000/...``. Each image is a noisy background with one filled ellipse or rectangle of random size
and position; the shape's colour is the class's hue (evenly spaced around the colour wheel) with a little jitter,
so a model can learn the classes from colour. The output is a deterministic function of the arguments.

Usage: python scripts/make_synthetic_imagefolder.py --out DIR --classes 4 --train-per-class 8 \
    --val-per-class 2 --size 64 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["class_name", "synthetic_image", "write_synthetic_imagefolder"]


def class_name(index: int) -> str:
    """The folder name of class ``index``."""
    return f"class_{index:03d}"


def synthetic_image(label: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of class ``label`` of ``classes``, drawn with ``rng``."""
    background = rng.integers(0, 96, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    hue = (label / classes + rng.uniform(-0.2, 0.2) / classes) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    colour = (int(red * 255), int(green * 255), int(blue * 255))
    width, height = (int(v) for v in rng.integers(size // 3, size, size=2))
    left, top = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
    box = (left, top, left + width - 1, top + height - 1)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    noise = rng.integers(-16, 17, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8), "RGB")


def write_synthetic_imagefolder(
    out: str | os.PathLike[str],
    classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    size: int = 64,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write the tree (see the module docstring) under ``out`` and return ``out`` as a path.

    Args:
        out: Output folder (created; existing files of the same names are overwritten).
        classes: Number of classes.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        size: Side of the square images, in pixels.
        seed: Seed of all random choices.
        quality: JPEG quality.

    Raises:
        ValueError: If a count is negative, ``classes`` is below 1 or ``size`` is below 3.
    """
    if classes < 1 or size < 3 or train_per_class < 0 or val_per_class < 0:
        raise ValueError(
            f"need classes >= 1, size >= 3 and non-negative counts; got classes={classes}, size={size}, "
            f"train_per_class={train_per_class}, val_per_class={val_per_class}"
        )
    root = Path(out)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = synthetic_image(label, classes, size, rng)
                image.save(folder / f"{class_name(label)}_{i:05d}.JPEG", format="JPEG", quality=quality)
    return root


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=8)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_synthetic_imagefolder(
        args.out, args.classes, args.train_per_class, args.val_per_class, args.size, args.seed
    )
    total = args.classes * (args.train_per_class + args.val_per_class)
    print(f"wrote {total} JPEGs of {args.size}x{args.size} in {args.classes} classes under {root}")


if __name__ == "__main__":
    main()
