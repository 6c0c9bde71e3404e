"""The embedded default training job: a model from the zoo on MNIST-5k, SGD with momentum, optionally K-FAC.

Kept as small functions (settings -> model -> optimizer(s) -> epochs of train + evaluate) so that a
YAML-configured, multi-process launcher can reuse them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist.models import build_model
from launch.data.mnist import Split, load_mnist_5k

__all__ = [
    "OPTIMIZERS",
    "EpochResult",
    "Preconditioner",
    "TrainSettings",
    "evaluate",
    "make_optimizers",
    "run_training",
    "train_epoch",
]

OPTIMIZERS = ("kfac", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of the default job; the defaults are the embedded MNIST-5k run.

    The K-FAC defaults (damping 0.03, KL-clip 1e-4, inverses every 10 steps) come from a small sweep on this
    job: with lr 0.05 and momentum 0.9, KL-clip 1e-3 or 1e-2 lets the first epochs' steps grow too large
    (train loss 0.1-0.3 after 5 epochs, vs. 0.03-0.05 with 1e-4), and without KL-clip the run diverges unless
    lr <= 0.01.
    """

    model: str = "small_cnn"
    optimizer: str = "kfac"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = 0.03
    factor_update_steps: int = 1
    inv_update_steps: int = 10
    kl_clip: float | None = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject bad values with a message naming the setting."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "factor_update_steps", "inv_update_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("lr", "damping"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number > 0; got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {getattr(self, name)!r}")
        if self.kl_clip is not None and not self.kl_clip > 0:
            raise ValueError(f"kl_clip must be a number > 0 or None; got {self.kl_clip!r}")


class Preconditioner(Protocol):
    """What the training loop needs from a gradient preconditioner (e.g. ``kfac_dist.KFACPreconditioner``)."""

    def step(self) -> None:
        """Precondition the gradients in place, between ``loss.backward()`` and ``optimizer.step()``."""


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one epoch."""

    epoch: int
    train_loss: float
    test_accuracy: float
    seconds: float


def make_optimizers(
    model: nn.Module, settings: TrainSettings
) -> tuple[torch.optim.Optimizer, Preconditioner | None]:
    """Build SGD with momentum and, for ``optimizer="kfac"``, a K-FAC preconditioner of ``model``.

    Args:
        model: The model to train.
        settings: The job settings.

    Returns:
        ``(optimizer, preconditioner)``; the preconditioner is None for plain SGD.
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    if settings.optimizer == "sgd":
        return optimizer, None
    from kfac_dist import KFACPreconditioner

    preconditioner = KFACPreconditioner(
        model,
        factor_update_steps=settings.factor_update_steps,
        inv_update_steps=settings.inv_update_steps,
        damping=settings.damping,
        kl_clip=settings.kl_clip,
        lr=settings.lr,
    )
    return optimizer, preconditioner


def train_epoch(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    preconditioner: Preconditioner | None,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """Train for one pass over ``data`` in a random order; the last, smaller batch is dropped.

    Args:
        model: The model.
        data: Training images and labels.
        optimizer: The optimizer.
        preconditioner: Called as ``loss.backward(); preconditioner.step(); optimizer.step()``, or None.
        batch_size: Examples per step.
        generator: Source of the shuffle.

    Returns:
        The mean training loss over the epoch's steps.
    """
    model.train()
    order = torch.randperm(len(data.labels), generator=generator)
    steps = len(order) // batch_size
    total = torch.zeros(())
    for i in range(steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
        loss.backward()
        if preconditioner is not None:
            preconditioner.step()
        optimizer.step()
        total += loss.detach()
    return float(total) / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 500) -> float:
    """Classification accuracy of ``model`` on ``data``, in [0, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        logits = model(data.images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data.labels)


def run_training(
    settings: TrainSettings, on_epoch: Callable[[EpochResult], None] | None = None
) -> list[EpochResult]:
    """Run the whole job: seed, load MNIST-5k, build the model and optimizers, train and evaluate every epoch.

    Args:
        settings: The job settings.
        on_epoch: Called with each epoch's result as soon as it is known.

    Returns:
        One result per epoch.
    """
    torch.manual_seed(settings.seed)
    train, test = load_mnist_5k(seed=settings.seed)
    model = build_model(settings.model, num_classes=10)
    optimizer, preconditioner = make_optimizers(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    results = []
    for epoch in range(1, settings.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(model, train, optimizer, preconditioner, settings.batch_size, generator)
        result = EpochResult(epoch, loss, evaluate(model, test), time.perf_counter() - start)
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return results
