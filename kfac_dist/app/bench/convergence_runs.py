"""One run of the convergence benchmark: its task (data, model, targets), optimizer and recorded curves.

A run trains from ``torch.manual_seed(seed)`` on batches drawn from a permutation seeded by the same seed, so the
methods of one seed start from the same weights and see the same batches. Every ``eval_every`` steps (and at step
0) it records the cross-entropy over the whole training split and the test accuracy; only the training steps
are timed (``time.perf_counter`` around each stretch of steps between two checkpoints).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.data.mnist import Split, load_mnist_5k

__all__ = [
    "METHODS",
    "METHOD_TITLES",
    "TASKS",
    "Hyper",
    "KFACSettings",
    "RunRecord",
    "Task",
    "batch_order",
    "evaluate",
    "finite_or_none",
    "load_digits_split",
    "load_task_data",
    "train_run",
]

METHODS: tuple[str, ...] = ("sgd", "adam", "kfac")
METHOD_TITLES = {"sgd": "SGD-momentum 0.9", "adam": "Adam", "kfac": "SGD-momentum 0.9 + K-FAC"}
MOMENTUM = 0.9
DIVERGED_LOSS = 100.0  # a training loss above this (or NaN) ends the run as diverged
Hyper = dict[str, float]


@dataclass(frozen=True)
class Task:
    """One training problem: data set, model, the two targets, step budget and checkpoint period."""

    name: str
    title: str
    data: str  # "mnist5k" or "digits"
    model: ModelSpec
    loss_target: float  # cross-entropy over the whole training split <= this
    acc_target: float  # test accuracy >= this
    max_steps: int
    eval_every: int
    batch_size: int = 64

    def to_json(self) -> dict[str, Any]:
        """JSON-able fields (the model as its builder and keyword arguments)."""
        data = asdict(self)
        return data | {"model": self.model.builder, "model_kwargs": dict(self.model.kwargs)}


TASKS: dict[str, Task] = {
    "mnist5k_cnn": Task(
        "mnist5k_cnn", "MNIST-5k, small CNN", "mnist5k", ModelSpec("small_cnn", {}, (1, 28, 28)), 0.05, 0.96, 500, 25
    ),
    "digits_mlp": Task(
        "digits_mlp", "sklearn digits (8x8), MLP 64-64-64-10", "digits",
        ModelSpec("mlp", {"in_features": 64, "hidden": [64, 64]}, (1, 8, 8)), 0.05, 0.96, 400, 20,
    ),
}  # fmt: skip
"""The benchmark's tasks; targets and budgets were set from a pilot so that every method can reach them."""


@dataclass(frozen=True)
class KFACSettings:
    """The K-FAC settings shared by every K-FAC grid point (lr and damping come from the grid).

    The benchmark's protocol (docs/BENCHMARKS.md), stated here rather than taken from the library's defaults, so
    that a change of default does not change what the benchmark measures.
    """

    factor_update_steps: int = 10
    inv_update_steps: int = 100
    kl_clip: float = 1e-3
    compute_method: str = "eigen"


@dataclass
class RunRecord:
    """One training run: its curves and the steps / training seconds to each target (None: not reached)."""

    task: str
    phase: str  # "tuning" or "measure"
    method: str
    hyper: Hyper
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    diverged: bool = False
    steps_to_loss: int | None = None
    seconds_to_loss: float | None = None
    steps_to_acc: int | None = None
    seconds_to_acc: float | None = None

    def ms_per_step(self) -> float:
        """Mean training milliseconds per step over the whole run."""
        return 1e3 * self.seconds[-1] / self.steps[-1] if self.steps and self.steps[-1] else math.nan

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (a non-finite loss becomes None)."""
        out = asdict(self)
        out["train_loss"] = [finite_or_none(v) for v in self.train_loss]
        out["ms_per_step"] = finite_or_none(self.ms_per_step())
        return out


def finite_or_none(value: float) -> float | None:
    """``value`` if it is finite, else None (JSON has no NaN / Infinity)."""
    return value if math.isfinite(value) else None


def load_task_data(task: Task) -> tuple[Split, Split]:
    """Training and test split of a task (both deterministic)."""
    if task.data == "mnist5k":
        return load_mnist_5k(seed=0)
    if task.data == "digits":
        return load_digits_split()
    raise ValueError(f"unknown data set {task.data!r}")


def load_digits_split(train_fraction: float = 0.8) -> tuple[Split, Split]:
    """scikit-learn's 1,797 real 8x8 digits, split per class (rng seed 0) and standardised with train statistics.

    Returns:
        ``(train, test)`` with images of shape (N, 1, 8, 8): 1,438 training and 359 test digits.
    """
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    except ImportError as error:
        raise ImportError(
            "the digits task needs scikit-learn: pip install -c requirements/constraints.txt -r requirements/bench.txt"
        ) from error
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(0)
    train_parts, test_parts = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = round(train_fraction * len(idx))
        train_parts.append(idx[:cut])
        test_parts.append(idx[cut:])
    train, test = rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))
    mean, std = float(pixels[train].mean()), float(pixels[train].std())

    def split(idx: np.ndarray) -> Split:
        images = torch.from_numpy((pixels[idx] - mean) / std).reshape(-1, 1, 8, 8).contiguous()
        return Split(images, torch.from_numpy(labels[idx]))

    return split(train), split(test)


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Index tensor (steps, batch_size): epochs of a seeded permutation, the incomplete last batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(num_examples, generator=generator)[: per_epoch * batch_size] for _ in range(epochs)]
    return torch.cat(rows).reshape(-1, batch_size)[:steps]


@torch.no_grad()
def evaluate(model: nn.Module, train: Split, test: Split, chunk: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy over the whole training split, test accuracy)."""
    total = 0.0
    for i in range(0, len(train.labels), chunk):
        logits = model(train.images[i : i + chunk])
        total += nn.functional.cross_entropy(logits, train.labels[i : i + chunk], reduction="sum").item()
    correct = sum(
        int((model(test.images[i : i + chunk]).argmax(1) == test.labels[i : i + chunk]).sum())
        for i in range(0, len(test.labels), chunk)
    )
    return total / len(train.labels), correct / len(test.labels)


def make_optimizer(
    model: nn.Module, method: str, hyper: Hyper, kfac: KFACSettings
) -> tuple[torch.optim.Optimizer, KFACPreconditioner | None]:
    """The optimizer (and, for ``"kfac"``, the preconditioner) of a method at a grid point."""
    lr = hyper["lr"]
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    if method not in ("sgd", "kfac"):
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if method == "sgd":
        return optimizer, None
    return optimizer, KFACPreconditioner(model, lr=lr, damping=hyper["damping"], **asdict(kfac))


def train_run(
    task: Task,
    data: tuple[Split, Split],
    method: str,
    hyper: Hyper,
    seed: int,
    kfac: KFACSettings,
    *,
    phase: str,
    stop_at_targets: bool,
    max_steps: int | None = None,
) -> RunRecord:
    """Train one model and record its curves.

    Args:
        task: The task (model, targets, budget, checkpoint period).
        data: ``(train, test)`` splits of the task.
        method: One of :data:`METHODS`.
        hyper: The grid point: ``lr`` (and ``damping`` for K-FAC).
        seed: Seed of the initial weights and of the batch order.
        kfac: K-FAC settings other than lr and damping.
        phase: Label stored in the record.
        stop_at_targets: End the run at the first checkpoint where both targets are reached.
        max_steps: Step budget (default: the task's).

    Returns:
        The record; a run whose training loss becomes NaN or exceeds 100 ends early with ``diverged=True``.
    """
    train, test = data
    steps = task.max_steps if max_steps is None else max_steps
    model = task.model.build(seed)
    optimizer, pre = make_optimizer(model, method, hyper, kfac)
    order = batch_order(len(train.labels), task.batch_size, steps, seed)
    record = RunRecord(task.name, phase, method, dict(hyper), seed)
    elapsed, step = 0.0, 0
    while True:
        loss, acc = evaluate(model, train, test)
        record.steps.append(step)
        record.seconds.append(elapsed)
        record.train_loss.append(loss)
        record.test_acc.append(acc)
        if record.steps_to_loss is None and loss <= task.loss_target:
            record.steps_to_loss, record.seconds_to_loss = step, elapsed
        if record.steps_to_acc is None and acc >= task.acc_target:
            record.steps_to_acc, record.seconds_to_acc = step, elapsed
        if not (math.isfinite(loss) and loss < DIVERGED_LOSS):
            record.diverged = True
            break
        reached = record.steps_to_loss is not None and record.steps_to_acc is not None
        if step >= steps or (stop_at_targets and reached):
            break
        until = min(steps, step + task.eval_every)
        start = time.perf_counter()
        for index in order[step:until]:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(train.images[index]), train.labels[index]).backward()
            if pre is not None:
                pre.step()
            optimizer.step()
        elapsed += time.perf_counter() - start
        step = until
    if pre is not None:
        pre.remove_hooks()
    return record
