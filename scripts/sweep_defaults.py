"""Measure K-FAC's default damping / KL-clip in kfac-dist's factor scale on MNIST-5k with the small CNN.

Trains the small CNN for a fixed number of steps with SGD-momentum + K-FAC over a damping x lr x kl_clip grid
and with plain SGD-momentum over an lr grid (same seed, same batches), and writes the final training loss
(over the whole training split) and test accuracy of each run to JSON and a Markdown table.

Usage: OMP_NUM_THREADS=1 python scripts/sweep_defaults.py --steps 250 --out docs/results/defaults
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.data.mnist import load_mnist_5k
from kfac_dist.app.models import build_model


def train(steps: int, lr: float, damping: float | None, kl_clip: float | None, seed: int) -> dict[str, float]:
    """One run; ``damping=None`` means plain SGD-momentum."""
    torch.manual_seed(seed)
    train_split, test_split = load_mnist_5k()
    model = build_model("small_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = None
    if damping is not None:
        pre = KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, lr=lr, inv_update_steps=10)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_split.labels), generator=generator)
    start = time.perf_counter()
    for step in range(steps):
        if (step * 64) % len(order) + 64 > len(order):
            order = torch.randperm(len(train_split.labels), generator=generator)
        index = order[(step * 64) % len(order) :][:64]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(train_split.images[index]), train_split.labels[index])
        loss.backward()
        if pre is not None:
            pre.step()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(train_split.images), train_split.labels).item()
        accuracy = (model(test_split.images).argmax(1) == test_split.labels).float().mean().item()
    return {"train_loss": train_loss, "test_accuracy": accuracy, "seconds": seconds}


def main() -> None:
    """Run the grid and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/defaults"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for lr in (0.01, 0.03, 0.1, 0.3):
        runs.append(
            {
                "method": "sgd",
                "lr": lr,
                "damping": None,
                "kl_clip": None,
                **train(args.steps, lr, None, None, args.seed),
            }
        )
        print(runs[-1], flush=True)
    for lr, damping, kl_clip in itertools.product((0.03, 0.1, 0.3), (0.01, 0.1, 1.0, 10.0), (1e-3, None)):
        result = train(args.steps, lr, damping, kl_clip, args.seed)
        runs.append({"method": "kfac", "lr": lr, "damping": damping, "kl_clip": kl_clip, **result})
        print(runs[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"steps": args.steps, "seed": args.seed, "runs": runs}, indent=1)
    )
    lines = [
        "| method | lr | damping | kl_clip | train loss | test acc | s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['lr']} | {r['damping']} | {r['kl_clip']} | {r['train_loss']:.4f} | "
        f"{r['test_accuracy']:.4f} | {r['seconds']:.1f} |"
        for r in runs
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
