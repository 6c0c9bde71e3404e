"""Builds what a run is made of from its config: device, model, data, optimizer, preconditioner, gradient sync."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.config import SCHEDULED_KFAC_OPTIONS, Config, ConfigError
from kfac_dist.app.config.schedules import kfac_hyperparameter
from kfac_dist.app.data.loaders import Loaders, build_datasets, build_loaders
from kfac_dist.app.env import RunEnv
from kfac_dist.app.models import build_model
from kfac_dist.comm import Communicator, TorchDistCommunicator
from kfac_dist.comm.backends import resolve_backend
from kfac_dist.options import KFACOptions


def resolve_device(cfg: Config, env: RunEnv) -> torch.device:
    """The device of this rank: ``training.device``, with "auto" meaning the local GPU if there is one."""
    wanted = cfg.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device: 'cuda' was asked for but no CUDA device is available; allowed: auto, cpu")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def make_communicator(cfg: Config) -> Communicator:
    """The communicator K-FAC, gradient averaging and metrics use (``comm.backend``)."""
    return resolve_backend(cfg.comm.backend, torch.cuda.is_available()).communicator()


def build_data(cfg: Config, env: RunEnv, device: torch.device) -> tuple[Loaders, int]:
    """This rank's loaders and the number of classes."""
    train, val, num_classes = build_datasets(
        cfg.data.name, cfg.data.root, image_size=cfg.data.image_size, seed=cfg.seed
    )
    loaders = build_loaders(
        train,
        val,
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        workers=cfg.data.workers,
        seed=cfg.seed,
        device=device,
    )
    return loaders, num_classes


def model_arguments(cfg: Config, num_classes: int | None) -> dict[str, Any]:
    """``build_model`` keyword arguments of the ``model`` section (the run and ``kfac-dist plan`` use them).

    Args:
        cfg: The config.
        num_classes: The data set's number of classes, used when ``model.num_classes`` is null; when both are
            None, ``num_classes`` is left out (the model's default).
    """
    kwargs: dict[str, Any] = {}
    if (cfg.model.num_classes or num_classes) is not None:
        kwargs["num_classes"] = cfg.model.num_classes or num_classes
    if cfg.model.width_multiplier != 1.0:
        kwargs["width_multiplier"] = cfg.model.width_multiplier
    return kwargs


def build_network(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model, seeded identically on every rank.

    Raises:
        ConfigError: ``model.num_classes`` is smaller than the data set's number of classes.
    """
    if cfg.model.num_classes is not None and cfg.model.num_classes < num_classes:
        raise ConfigError(
            ("model", "num_classes"),
            f"{cfg.model.num_classes} is smaller than the {num_classes} classes of data set {cfg.data.name!r}",
            f"an integer >= {num_classes}, or null (the data set's)",
        )
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, **model_arguments(cfg, num_classes)).to(device)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer``; its lr is set every step by the schedule."""
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
        )
    kind = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    betas = (opt.betas[0], opt.betas[1])
    return kind(model.parameters(), lr=opt.lr, betas=betas, weight_decay=opt.weight_decay)


def build_preconditioner(
    cfg: Config,
    model: nn.Module,
    comm: Communicator,
    steps_per_epoch: int,
    current_lr: Callable[[int], float],
    grad_scaler: Any,
) -> KFACPreconditioner | None:
    """K-FAC from the ``kfac`` section, or None when it is disabled (the SGD baseline runs the same loop)."""
    if not cfg.kfac.enabled:
        return None
    options = preconditioner_options(cfg, steps_per_epoch)
    return KFACPreconditioner(
        model,
        options,
        lr=current_lr,
        accumulation_steps=cfg.training.accumulation_steps,
        grad_scaler=grad_scaler,
        communicator=comm,
    )


def preconditioner_options(cfg: Config, steps_per_epoch: int) -> KFACOptions:
    """The ``kfac`` section's :class:`KFACOptions`, its scheduled options as callables of the K-FAC step.

    The run and ``kfac-dist plan`` both use them (:func:`kfac_hyperparameter`; a step's epoch is
    ``step // steps_per_epoch``).
    """
    scheduled: dict[str, Any] = {
        name: kfac_hyperparameter(cfg.kfac, name, steps_per_epoch) for name in SCHEDULED_KFAC_OPTIONS
    }
    return replace(cfg.kfac.library_options(), **scheduled)


def average_flat(model: nn.Module, allreduce: Callable[[torch.Tensor], None]) -> int:
    """Average every gradient of `model` with one `allreduce` of them all, flattened (as DDP does, without overlap).

    Args:
        model: The model whose ``.grad`` tensors are replaced by their averages.
        allreduce: Averages a tensor over the ranks in place.

    Returns:
        The bytes of the flat buffer (0 without a gradient).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    allreduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return flat.nbytes


@dataclass
class GradientSync:
    """How gradients are averaged over ranks: DDP for torch.distributed, the communicator otherwise."""

    comm: Communicator
    uses_ddp: bool

    def average(self, model: nn.Module) -> None:
        """Average every gradient over ranks when DDP does not (MPI and Horovod back-ends)."""
        if self.uses_ddp or self.comm.world_size == 1:
            return
        average_flat(model, lambda flat: self.comm.allreduce(flat, average=True, category="gradients").wait())


def wrap_model(model: nn.Module, comm: Communicator, device: torch.device) -> tuple[nn.Module, GradientSync]:
    """DDP-wrap the model when torch.distributed runs the job with several ranks."""
    if isinstance(comm, TorchDistCommunicator) and comm.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), GradientSync(comm, uses_ddp=True)
    return model, GradientSync(comm, uses_ddp=False)
