"""The config schema: one frozen, keyword-only dataclass per section, every field typed and bounded.

The field defaults are the embedded default run (``configs/mnist_cnn.yaml``): a small CNN on MNIST-5k with
K-FAC; the ``kfac`` section's are the library's own (:class:`kfac_dist.options.KFACOptions`, which it inherits).
docs/configs.md describes every key.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from kfac_dist.app.config.fields import Section, option
from kfac_dist.app.data.loaders import DATASET_NAMES
from kfac_dist.app.models import MODEL_NAMES
from kfac_dist.comm.backends import AUTO
from kfac_dist.comm.backends import BACKENDS as COMM_BACKENDS
from kfac_dist.options import OPTION_FIELDS, KFACOptions

#: Models that take ``width_multiplier`` (the ImageNet ResNets).
WIDTH_MODELS = tuple(name for name in MODEL_NAMES if name.startswith("resnet"))
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
#: ``none``: lr as given; ``linear_world_size``: lr x world size (KAISA); ``linear_batch_256``: lr x global batch / 256.
LR_SCALINGS = ("none", "linear_world_size", "linear_batch_256")
LR_SCHEDULES = ("step", "cosine")
#: ``comm.backend``: :data:`kfac_dist.comm.backends.BACKENDS`, or ``auto``.
BACKENDS = (AUTO, *COMM_BACKENDS)
AMP_MODES = ("none", "bf16", "fp16")
#: ``training.nonfinite``: what a non-finite loss or gradient does (see :mod:`kfac_dist.app.nonfinite`).
NONFINITE_POLICIES = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
#: Longest ``comm.timeout_s``: a week (longer is a hang, and 1e300 s is beyond what ``datetime.timedelta`` holds).
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: K-FAC options that may follow a milestone schedule (``<name>_schedule``).
SCHEDULED_KFAC_OPTIONS = ("damping", "factor_update_steps", "inv_update_steps")


def _strictly_increasing(values: tuple[int, ...]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """The network, from ``kfac_dist.app.models``.

    Attributes:
        name: A model of :data:`kfac_dist.app.models.MODEL_NAMES`.
        num_classes: Output logits; null takes the data set's number of classes.
        width_multiplier: Channel scale of the ImageNet ResNets (:data:`WIDTH_MODELS`); 1.0 for the others.
    """

    name: str = option("small_cnn", choices=MODEL_NAMES)
    num_classes: int | None = option(None, low=1)
    width_multiplier: float = option(1.0, low=0, low_open=True)

    def _check(self) -> None:
        if self.width_multiplier != 1.0 and self.name not in WIDTH_MODELS:
            raise self._fail(
                "width_multiplier",
                f"only the ImageNet ResNets take it, not {self.name!r}",
                f"1.0, or any value > 0 with model.name one of {', '.join(WIDTH_MODELS)}",
                related=["name"],
            )

    def build_kwargs(self, data_classes: int) -> dict[str, object]:
        """Keyword arguments of ``kfac_dist.app.models.build_model(self.name, ...)`` for that many data classes."""
        kwargs: dict[str, object] = {"num_classes": self.num_classes or data_classes}
        if self.name in WIDTH_MODELS:
            kwargs["width_multiplier"] = self.width_multiplier
        return kwargs


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """The data set and how each rank loads it.

    Attributes:
        name: ``mnist-5k`` (embedded), ``cifar10`` (python batches under ``root``) or ``imagenet`` (an ImageFolder
            tree ``root/train``, ``root/val``; also the synthetic trees of scripts/make_synthetic_imagefolder.py).
        root: Data directory; required for ``cifar10`` and ``imagenet`` (the data loader checks that it exists).
        batch_size: Training examples per rank per micro-batch.
        val_batch_size: Validation examples per rank per batch; null: ``batch_size``.
        workers: Loader worker processes per rank (0: load in the training process).
        image_size: ImageNet training crop and validation center crop.
        val_resize: ImageNet shorter side before the validation crop; null: ``round(image_size * 256 / 224)``.
    """

    name: str = option("mnist-5k", choices=DATASET_NAMES)
    root: str | None = None
    batch_size: int = option(32, low=1)
    val_batch_size: int | None = option(None, low=1)
    workers: int = option(0, low=0)
    image_size: int = option(224, low=1)
    val_resize: int | None = option(None, low=1)

    def _check(self) -> None:
        if self.root is None and self.name in ("cifar10", "imagenet"):
            raise self._fail("root", f"data set {self.name!r} needs its data directory", "a path", related=["name"])
        if self.val_resize is not None and self.val_resize < self.image_size:
            raise self._fail(
                "val_resize",
                f"{self.val_resize} is smaller than image_size {self.image_size}",
                f"an integer >= image_size ({self.image_size}) or null",
                related=["image_size"],
            )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig(Section):
    """The first-order optimizer that applies the (preconditioned) gradients.

    Attributes:
        name: ``sgd``, ``adam`` or ``adamw``.
        lr: Base learning rate, before ``lr_scaling``.
        lr_scaling: ``none``; ``linear_world_size`` (lr x W, KAISA); ``linear_batch_256`` (lr x global batch / 256,
            Goyal et al.; the global batch counts every rank and micro-batch).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD with momentum > 0 only).
        betas: Adam's (beta1, beta2).
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW).
        label_smoothing: Label smoothing of the cross-entropy loss.
    """

    name: str = option("sgd", choices=OPTIMIZER_NAMES)
    lr: float = option(0.025, low=0, low_open=True)
    lr_scaling: str = option("linear_world_size", choices=LR_SCALINGS)
    momentum: float = option(0.9, low=0, high=1)
    nesterov: bool = False
    betas: tuple[float, ...] = option((0.9, 0.999), low=0, high=1)
    weight_decay: float = option(5e-4, low=0)
    label_smoothing: float = option(0.0, low=0, high=1)

    def _check(self) -> None:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise self._fail(
                "nesterov", "needs optimizer sgd with momentum > 0", "false, or true with sgd and momentum > 0"
            )
        if len(self.betas) != 2:
            raise self._fail("betas", f"has {len(self.betas)} items", "a list of two numbers in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class LRScheduleConfig(Section):
    """The learning rate as a function of the (fractional) epoch; see :func:`kfac_dist.app.config.learning_rate`.

    Attributes:
        kind: ``step`` (x ``gamma`` at each milestone) or ``cosine`` (cosine decay to 0 at the last epoch).
        warmup_epochs: Linear warm-up from the unscaled lr to the scaled one (needs ``optimizer.lr_scaling``).
        milestones: Epochs at which a step schedule multiplies the lr by ``gamma`` (strictly increasing).
        gamma: Factor of each step.
    """

    kind: str = option("step", choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.0, low=0)
    milestones: tuple[int, ...] = option((), low=1)
    gamma: float = option(0.1, low=0, high=1, low_open=True, high_open=False)

    def _check(self) -> None:
        if not _strictly_increasing(self.milestones):
            raise self._fail("milestones", f"{list(self.milestones)} is not strictly increasing", "increasing epochs")
        if self.kind == "cosine" and self.milestones:
            raise self._fail("milestones", "a cosine schedule takes no milestones", "[] with kind cosine")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(Section):
    """A piecewise-constant schedule of a K-FAC option by epoch: never compounding.

    The option's own value holds until the first milestone; from epoch ``milestones[i]`` on the value is
    ``values[i]``, whatever came before.

    Attributes:
        milestones: Epochs at which the value changes (strictly increasing, >= 1).
        values: The value from each milestone on (as many as milestones).
    """

    milestones: tuple[int, ...] = option(low=1)
    values: tuple[float, ...] = option(low=0, low_open=True)

    def _check(self) -> None:
        if not self.milestones:
            raise self._fail("milestones", "is empty", "a non-empty list of increasing epochs >= 1")
        if not _strictly_increasing(self.milestones):
            raise self._fail("milestones", f"{list(self.milestones)} is not strictly increasing", "increasing epochs")
        if len(self.values) != len(self.milestones):
            raise self._fail(
                "values",
                f"{len(self.values)} values for {len(self.milestones)} milestones",
                f"a list of {len(self.milestones)} values, one from each milestone on",
                related=["milestones"],
            )

    def at_epoch(self, initial: float, epoch: int) -> float:
        """The value at ``epoch``: ``initial`` before the first milestone, else the last milestone's value."""
        passed = bisect.bisect_right(self.milestones, epoch)
        return initial if passed == 0 else self.values[passed - 1]


@dataclass(frozen=True, kw_only=True)
class _KFACSwitch:
    """The first key of the ``kfac`` section (a base of :class:`KFACConfig` only to put ``enabled`` first)."""

    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class KFACConfig(Section, KFACOptions, _KFACSwitch):
    """K-FAC: every field of :class:`kfac_dist.options.KFACOptions`, plus ``enabled`` and milestone schedules.

    Same names, defaults, ranges and docs as the library's (docs/configs.md). Dtypes are named (``float32``); a
    config holds no callables: options that change with the epoch have a ``<name>_schedule``.

    Attributes:
        enabled: Precondition with K-FAC; false trains with the optimizer alone (the baseline, same loop).
        damping_schedule: Damping by epoch milestone (null: constant).
        factor_update_steps_schedule: ``factor_update_steps`` by epoch milestone (null: constant).
        inv_update_steps_schedule: ``inv_update_steps`` by epoch milestone (null: constant).
    """

    damping_schedule: ScheduleConfig | None = None
    factor_update_steps_schedule: ScheduleConfig | None = None
    inv_update_steps_schedule: ScheduleConfig | None = None

    def library_options(self) -> KFACOptions:
        """The :class:`KFACOptions` this section holds (schedules aside: :mod:`kfac_dist.app.config.schedules`)."""
        return KFACOptions(**{name: getattr(self, name) for name in OPTION_FIELDS})

    def _check(self) -> None:
        for name in ("factor_update_steps", "inv_update_steps"):
            schedule = getattr(self, f"{name}_schedule")
            if schedule is not None and any(v != int(v) for v in schedule.values):
                raise self._fail(f"{name}_schedule.values", "must be integers", "a list of integers >= 1")

    def schedule(self, name: str) -> ScheduleConfig | None:
        """The milestone schedule of one of :data:`SCHEDULED_KFAC_OPTIONS`, or None if it is constant."""
        if name not in SCHEDULED_KFAC_OPTIONS:
            raise ValueError(f"{name!r} has no schedule; expected one of {', '.join(SCHEDULED_KFAC_OPTIONS)}")
        schedule: ScheduleConfig | None = getattr(self, f"{name}_schedule")
        return schedule


@dataclass(frozen=True, kw_only=True)
class CommConfig(Section):
    """How the processes talk.

    Attributes:
        backend: ``auto`` (NCCL with CUDA, else gloo), ``nccl``, ``gloo``, ``mpi`` or ``horovod``.
        timeout_s: Timeout of a collective, in seconds (a hung rank fails the run after this long): at least 1 s
            (shorter fails healthy runs), at most a week (:data:`MAX_TIMEOUT_S`).
    """

    backend: str = option("auto", choices=BACKENDS)
    timeout_s: float = option(1800.0, low=1, high=MAX_TIMEOUT_S, high_open=False)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig(Section):
    """The training loop.

    Attributes:
        epochs: Passes over the training set.
        max_steps: Stop after this many optimizer steps (smoke runs), finishing like an epoch (validation, a metrics
            row, a checkpoint); null: no cap.
        accumulation_steps: Micro-batches per optimizer step.
        amp: Mixed precision: ``none``, ``bf16`` or ``fp16`` (with a gradient scaler).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        log_every_steps: Rank 0 prints a line (loss, lr, step time, K-FAC share, ETA) every this many optimizer steps;
            the metrics are read from the device only then, and numerical fallbacks are reported then.
        grad_clip: Largest global norm of the gradient the optimizer applies (after K-FAC); null: no clipping.
        nonfinite: A NaN/Inf loss or gradient: ``stop`` the run at the next logging interval (no per-step sync), or
            ``skip`` that step's update (each step is checked before it is applied: one host sync per step).
        nonfinite_max_skips: With ``skip``: the most non-finite steps in a row skipped; one more stops the run.
    """

    epochs: int = option(5, low=1)
    max_steps: int | None = option(None, low=1)
    accumulation_steps: int = option(1, low=1)
    amp: str = option("none", choices=AMP_MODES)
    device: str = option("auto", choices=DEVICES)
    log_every_steps: int = option(20, low=1)
    grad_clip: float | None = option(None, low=0, low_open=True)
    nonfinite: str = option("stop", choices=NONFINITE_POLICIES)
    nonfinite_max_skips: int = option(10, low=0)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(Section):
    """Checkpoints.

    Attributes:
        dir: Checkpoint directory; null: ``<logging.dir>/checkpoints``.
        every_epochs: Save every this many epochs, after the last and at a ``training.max_steps`` stop; null: never
            at an epoch's end (not even the last).
        every_steps: Also save every this many optimizer steps (counted over the whole run), mid-epoch too; null: off.
        resume: ``auto`` (the latest checkpoint in ``dir``, if any), ``none`` (start fresh), or a checkpoint path.
        keep: How many of the latest checkpoints to keep.
    """

    dir: str | None = None
    every_epochs: int | None = option(1, low=1)
    every_steps: int | None = option(None, low=1)
    resume: str = "none"
    keep: int = option(2, low=1)

    def _check(self) -> None:
        if not self.resume:
            raise self._fail("resume", "is empty", "'auto', 'none' or a checkpoint path")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    """Where the run's records go.

    Attributes:
        dir: The run directory (``metrics.csv``, ``tensorboard/``, by default ``checkpoints/``).
        csv: Write ``metrics.csv``.
        tensorboard: Write TensorBoard event files.
        progress_bar: Rank 0 draws a carriage-return bar on stderr in place of the log lines, only when stderr is a
            terminal.
    """

    dir: str = "runs/mnist_cnn"
    csv: bool = True
    tensorboard: bool = False
    progress_bar: bool = False


@dataclass(frozen=True, kw_only=True)
class Config(Section):
    """A whole run; the defaults are the embedded default (configs/mnist_cnn.yaml).

    Attributes:
        seed: Seed of initialisation, shuffles, augmentation and the MNIST-5k split.
        model: See :class:`ModelConfig`.
        data: See :class:`DataConfig`.
        optimizer: See :class:`OptimizerConfig`.
        lr_schedule: See :class:`LRScheduleConfig`.
        kfac: See :class:`KFACConfig`.
        comm: See :class:`CommConfig`.
        training: See :class:`TrainingConfig`.
        checkpoint: See :class:`CheckpointConfig`.
        logging: See :class:`LoggingConfig`.
    """

    seed: int = option(0, low=0, high=2**32)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check(self) -> None:
        if self.lr_schedule.warmup_epochs > 0 and self.optimizer.lr_scaling == "none":
            raise self._fail(
                "lr_schedule.warmup_epochs",
                "warm-up ramps from the unscaled to the scaled lr, but optimizer.lr_scaling is 'none'",
                "0 with lr_scaling 'none', or any number >= 0 with another lr_scaling",
                related=["optimizer.lr_scaling"],
            )

    def checkpoint_dir(self) -> Path:
        """Where checkpoints go: ``checkpoint.dir``, or ``<logging.dir>/checkpoints`` when it is null."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir is not None else Path(self.logging.dir, "checkpoints")
