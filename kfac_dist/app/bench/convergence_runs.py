"""One run of the convergence benchmark: its task (data, model, loss, targets, batch plan) and recorded curves.

A run trains from ``torch.manual_seed(seed)`` on batches drawn from a permutation seeded by the same seed, so the
methods of one seed start from the same weights and see the same batches. Every ``eval_every`` steps (and at step
0) it records the task's loss over the whole training split and, for a classification task, the test accuracy;
only the training steps are timed (``time.perf_counter`` around each stretch of steps between two checkpoints),
including a K-FAC method's extra passes (the sampled backward of ``fisher="mc"``, the forward of adaptive damping).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.bench.convergence_methods import METHODS, Hyper, KFACSettings, make_optimizer
from kfac_dist.app.data.mnist import Split, load_mnist_5k

__all__ = [
    "DIVERGED_LOSS",
    "TASKS",
    "BatchPlan",
    "RunRecord",
    "Task",
    "batch_order",
    "evaluate",
    "finite_or_none",
    "load_digits_split",
    "load_task_data",
    "task_loss",
    "train_run",
]

DIVERGED_LOSS = 100.0  # a training loss above this (or NaN) ends the run as diverged
LOSSES = ("cross_entropy", "binary_cross_entropy")


@dataclass(frozen=True)
class BatchPlan:
    """A batch size of a task's sweep, with its step budget, checkpoint period and K-FAC decomposition period."""

    batch_size: int
    max_steps: int
    eval_every: int
    inv_update_steps: int


@dataclass(frozen=True)
class Task:
    """One training problem at one batch size: data, model, loss, targets, budget and checkpoint period.

    ``loss``: ``"cross_entropy"`` (classification: targets on the training loss and the test accuracy) or
    ``"binary_cross_entropy"`` (an autoencoder of pixel intensities: a target on the training loss only,
    ``acc_target`` None). ``sweep``: the batch plans of the task's batch-size sweep (:meth:`at`); the task's own
    fields are those of one of them.
    """

    name: str
    title: str
    data: str  # "mnist5k", "mnist5k_pixels" or "digits"
    model: ModelSpec
    loss: str
    loss_target: float  # the task's loss over the whole training split <= this
    acc_target: float | None  # test accuracy >= this (classification only)
    sweep: tuple[BatchPlan, ...]
    batch_size: int = 64
    max_steps: int = 500
    eval_every: int = 25
    inv_update_steps: int = 100

    @property
    def key(self) -> str:
        """The name of this task at its batch size: ``<name>_b<batch>``."""
        return f"{self.name}_b{self.batch_size}"

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets this task has: ``("loss", "acc")`` or ``("loss",)``."""
        return ("loss",) if self.acc_target is None else ("loss", "acc")

    def at(self, batch_size: int) -> Task:
        """The task at ``batch_size``: the sweep's plan for it; a size outside the sweep keeps the first's budget."""
        plans = {p.batch_size: p for p in self.sweep}
        plan = plans.get(batch_size, replace(self.sweep[0], batch_size=batch_size))
        return replace(self, **asdict(plan))

    def to_json(self) -> dict[str, Any]:
        """JSON-able fields (the model as its builder and keyword arguments)."""
        data = asdict(self)
        return data | {"key": self.key, "model": self.model.builder, "model_kwargs": dict(self.model.kwargs)}


def _task(name: str, title: str, data: str, model: ModelSpec, loss: str, targets: tuple[float, float | None],
          plans: tuple[tuple[int, int, int, int], ...]) -> Task:  # fmt: skip
    sweep = tuple(BatchPlan(*p) for p in plans)
    return replace(Task(name, title, data, model, loss, *targets, sweep), **asdict(sweep[0]))


TASKS: dict[str, Task] = {
    "mnist5k_cnn": _task(
        "mnist5k_cnn", "MNIST-5k, small CNN", "mnist5k", ModelSpec("small_cnn", {}, (1, 28, 28)), "cross_entropy",
        (0.05, 0.96), ((64, 500, 25, 100), (250, 300, 10, 30), (1000, 150, 5, 10), (4000, 100, 5, 10)),
    ),
    "mnist5k_autoencoder": _task(
        "mnist5k_autoencoder", "MNIST-5k, deep tanh autoencoder 784-256-128-32 (BCE)", "mnist5k_pixels",
        ModelSpec("autoencoder", {}, (1, 28, 28)), "binary_cross_entropy",
        (0.20, None), ((64, 800, 20, 100), (1000, 500, 10, 10)),
    ),
    "digits_mlp": _task(
        "digits_mlp", "sklearn digits (8x8), MLP 64-64-64-10", "digits",
        ModelSpec("mlp", {"in_features": 64, "hidden": [64, 64]}, (1, 8, 8)), "cross_entropy",
        (0.05, 0.96), ((64, 400, 20, 100),),
    ),
}  # fmt: skip
"""The benchmark's tasks and their batch-size sweeps (batch, steps budget, checkpoint period, decomposition period).

Targets and budgets were set from a pilot (tuned SGD-momentum and Adam, one seed) so that the best first-order
method reaches them in about half the budget; on the autoencoder every method first stalls on a plateau at 0.264
(the mean image) and tuned SGD-momentum does not leave it within the budget. K-FAC's decompositions come every 10
factor updates at batch 64 and on every factor update from batch 1,000 on (a large batch needs few steps, and a
decomposition costs less than its factor step there).
"""


@dataclass
class RunRecord:
    """One training run: its curves and the steps / training seconds to each target (None: not reached).

    K-FAC runs also record, per checkpoint, the damping in use, and over the whole run the steps whose KL-clip
    scale was below 1 (the clip bound) and the median scale.
    """

    task: str  # the task's key (name and batch size)
    phase: str  # "warmup", "tuning" or "measure"
    method: str
    hyper: Hyper
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float | None] = field(default_factory=list)
    damping: list[float] = field(default_factory=list)
    budget: int = 0
    diverged: bool = False
    steps_to_loss: int | None = None
    seconds_to_loss: float | None = None
    steps_to_acc: int | None = None
    seconds_to_acc: float | None = None
    kl_clipped_steps: int = 0
    kl_scale_median: float | None = None

    def ms_per_step(self) -> float:
        """Mean training milliseconds per step over the whole run."""
        return 1e3 * self.seconds[-1] / self.steps[-1] if self.steps and self.steps[-1] else math.nan

    def reached(self, targets: tuple[str, ...]) -> bool:
        """Whether every one of ``targets`` was reached."""
        return all(getattr(self, f"steps_to_{key}") is not None for key in targets)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (a non-finite loss becomes None)."""
        out = asdict(self)
        out["train_loss"] = [finite_or_none(v) for v in self.train_loss]
        out["ms_per_step"] = finite_or_none(self.ms_per_step())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """The record of :meth:`to_json`'s dict (a missing loss is NaN again)."""
        names = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names})
        record.train_loss = [math.nan if v is None else v for v in record.train_loss]
        return record


def finite_or_none(value: float) -> float | None:
    """``value`` if it is finite, else None (JSON has no NaN / Infinity)."""
    return value if math.isfinite(value) else None


def load_task_data(task: Task) -> tuple[Split, Split]:
    """Training and test split of a task (both deterministic)."""
    if task.data == "mnist5k":
        return load_mnist_5k(seed=0)
    if task.data == "mnist5k_pixels":
        return load_mnist_5k(seed=0, normalize=False)
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


def task_loss(task: Task, outputs: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    """The task's loss of ``outputs``: cross-entropy against the labels, or BCE (logits) against the pixels."""
    if task.loss == "cross_entropy":
        return F.cross_entropy(outputs, labels, **kw)
    return F.binary_cross_entropy_with_logits(outputs, images.flatten(1), **kw)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, train: Split, test: Split, chunk: int = 1000) -> tuple[float, float | None]:
    """(mean loss over the whole training split, test accuracy or None for a task without an accuracy target)."""
    total = 0.0
    for i in range(0, len(train.labels), chunk):
        images, labels = train.images[i : i + chunk], train.labels[i : i + chunk]
        total += task_loss(task, model(images), images, labels, reduction="sum").item()
    per_example = 1 if task.loss == "cross_entropy" else train.images[0].numel()  # BCE: the mean over pixels
    if task.acc_target is None:
        return total / (len(train.labels) * per_example), None
    correct = sum(
        int((model(test.images[i : i + chunk]).argmax(1) == test.labels[i : i + chunk]).sum())
        for i in range(0, len(test.labels), chunk)
    )
    return total / (len(train.labels) * per_example), correct / len(test.labels)


@dataclass
class _KLTally:
    """A K-FAC run's KL-clip scales, one per step (read after each step: a host read, timed with the step)."""

    scales: list[float] = field(default_factory=list)

    def record(self, scale: torch.Tensor | None) -> None:
        if scale is not None:
            self.scales.append(float(scale))

    def write(self, record: RunRecord) -> None:
        record.kl_clipped_steps = sum(s < 1.0 for s in self.scales)
        record.kl_scale_median = statistics.median(self.scales) if self.scales else None


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
        task: The task at one batch size (model, loss, targets, budget, checkpoint period).
        data: ``(train, test)`` splits of the task.
        method: A name of :data:`~kfac_dist.app.bench.convergence_methods.METHODS`.
        hyper: The grid point: ``lr`` (and ``damping`` for K-FAC).
        seed: Seed of the initial weights, of the batch order and of a MC Fisher's draws.
        kfac: K-FAC settings other than lr and damping (the method's variant is applied on top).
        phase: Label stored in the record.
        stop_at_targets: End the run at the first checkpoint where every target of the task is reached.
        max_steps: Step budget (default: the task's).

    Returns:
        The record; a run whose training loss becomes NaN or exceeds 100 ends early with ``diverged=True``.
    """
    train, test = data
    steps = task.max_steps if max_steps is None else max_steps
    model = task.model.build(seed)
    optimizer, pre = make_optimizer(model, METHODS[method], hyper, kfac, task.inv_update_steps)
    order = batch_order(len(train.labels), task.batch_size, steps, seed)
    generator = torch.Generator().manual_seed(seed)
    record = RunRecord(task.key, phase, method, dict(hyper), seed, budget=steps)
    kl = _KLTally()
    elapsed, step = 0.0, 0
    while True:
        loss, acc = evaluate(model, task, train, test)
        record.steps.append(step)
        record.seconds.append(elapsed)
        record.train_loss.append(loss)
        record.test_acc.append(acc)
        if pre is not None:
            record.damping.append(pre.damping)
        if record.steps_to_loss is None and loss <= task.loss_target:
            record.steps_to_loss, record.seconds_to_loss = step, elapsed
        if acc is not None and task.acc_target is not None and record.steps_to_acc is None and acc >= task.acc_target:
            record.steps_to_acc, record.seconds_to_acc = step, elapsed
        if not (math.isfinite(loss) and loss < DIVERGED_LOSS):
            record.diverged = True
            break
        if step >= steps or (stop_at_targets and record.reached(task.targets)):
            break
        until = min(steps, step + task.eval_every)
        start = time.perf_counter()
        for index in order[step:until]:
            images, labels = train.images[index], train.labels[index]
            optimizer.zero_grad(set_to_none=True)
            outputs = model(images)
            batch_loss = task_loss(task, outputs, images, labels)
            if pre is None:
                batch_loss.backward()
                optimizer.step()
                continue
            pre.backward(batch_loss, outputs, task.loss, generator=generator)
            pre.step()
            kl.record(pre.kl_clip_scale)
            optimizer.step()
            if pre.adaptation_due:
                with torch.no_grad():
                    pre.adapt_damping(batch_loss.detach(), task_loss(task, model(images), images, labels))
        elapsed += time.perf_counter() - start
        step = until
    if pre is not None:
        kl.write(record)
        pre.remove_hooks()
    return record
