"""Schedules a config describes: the learning rate by epoch and K-FAC's options by step.

Every schedule here is a pure function of the epoch or step: its value never depends on what came before, so
it is the same after a resume and never compounds (KAISA's example multiplies the current damping by the
schedule's factor at every scheduler step past a milestone; here the value at epoch 45 is the configured one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kfac_dist.app.config.schema import Config, KFACConfig

__all__ = ["kfac_hyperparameter", "learning_rate", "lr_scale"]


def lr_scale(cfg: Config, world_size: int) -> float:
    """The factor ``optimizer.lr_scaling`` applies to ``optimizer.lr`` for ``world_size`` ranks.

    The global batch of ``linear_batch_256`` is ``data.batch_size x world_size x training.accumulation_steps``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    scaling = cfg.optimizer.lr_scaling
    if scaling == "linear_world_size":
        return float(world_size)
    if scaling == "linear_batch_256":
        return cfg.data.batch_size * world_size * cfg.training.accumulation_steps / 256
    return 1.0


def learning_rate(cfg: Config, epoch: float, world_size: int) -> float:
    """The learning rate at a fractional ``epoch`` (``epoch + step / steps_per_epoch``), warm-up and decay included.

    Warm-up (``lr_schedule.warmup_epochs`` = w > 0) goes linearly from the unscaled ``optimizer.lr`` at epoch 0 to
    the scaled lr at epoch w (KAISA's and Goyal et al.'s ramp). After it, ``step`` multiplies the scaled lr by
    ``gamma`` once per milestone <= epoch, and ``cosine`` decays it as ``0.5 (1 + cos(pi t))``, with t going from 0
    at epoch w to 1 at ``training.epochs``.
    """
    schedule = cfg.lr_schedule
    scale = lr_scale(cfg, world_size)
    peak = cfg.optimizer.lr * scale
    warmup = schedule.warmup_epochs
    if epoch < warmup:
        return cfg.optimizer.lr + (peak - cfg.optimizer.lr) * max(epoch, 0.0) / warmup
    if schedule.kind == "cosine":
        span = cfg.training.epochs - warmup
        progress = min(1.0, (epoch - warmup) / span) if span > 0 else 1.0
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * schedule.gamma ** sum(1 for milestone in schedule.milestones if epoch >= milestone)


def kfac_hyperparameter(kfac: KFACConfig, name: str, steps_per_epoch: int) -> float | int | Callable[[int], float]:
    """A K-FAC option for ``KFACPreconditioner``: its constant, or a callable of the K-FAC step if it has a schedule.

    Args:
        kfac: The K-FAC section.
        name: One of ``damping``, ``factor_update_steps``, ``inv_update_steps``.
        steps_per_epoch: Optimizer steps (= K-FAC steps) per epoch; the step's epoch is ``step // steps_per_epoch``.

    Returns:
        The option's value if it has no schedule; else ``f(step)``, the value at the epoch of ``step``: the option's
        own value before the first milestone, ``values[i]`` from ``milestones[i]`` on. Update frequencies are ints.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    schedule = kfac.schedule(name)  # raises for a name that has no schedule
    initial: float | int = getattr(kfac, name)
    if schedule is None:
        return initial
    integer = name != "damping"

    def value(step: int) -> float:
        at_epoch = schedule.at_epoch(initial, step // steps_per_epoch)
        return int(at_epoch) if integer else at_epoch

    return value
