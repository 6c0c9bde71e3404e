"""Builds what a run is made of from its config: device, model, data, optimizer, preconditioner, gradient sync."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.config import Config, ConfigError
from kfac_dist.app.config.schedules import kfac_hyperparameter
from kfac_dist.app.data.loaders import Loaders, build_datasets, build_loaders
from kfac_dist.app.env import RunEnv
from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator
from kfac_dist.models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    backend = cfg.comm.backend
    if backend == "mpi":
        from kfac_dist.comm.mpi import MPICommunicator

        return MPICommunicator()
    if backend == "horovod":
        from kfac_dist.comm.horovod import HorovodCommunicator

        return HorovodCommunicator()
    return TorchDistCommunicator() if dist.is_available() and dist.is_initialized() else LocalCommunicator()


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
    return KFACPreconditioner(model, **options, lr=current_lr, grad_scaler=grad_scaler, communicator=comm)


def preconditioner_options(cfg: Config, steps_per_epoch: int) -> dict[str, Any]:
    """The ``KFACPreconditioner`` keyword arguments the config sets: all but lr, grad_scaler and communicator.

    The run and ``kfac-dist plan`` both use them. Scheduled options are callables of the K-FAC step
    (:func:`kfac_hyperparameter`; a step's epoch is ``step // steps_per_epoch``).
    """
    kfac = cfg.kfac
    return {
        "factor_update_steps": kfac_hyperparameter(kfac, "factor_update_steps", steps_per_epoch),
        "inv_update_steps": kfac_hyperparameter(kfac, "inv_update_steps", steps_per_epoch),
        "damping": kfac_hyperparameter(kfac, "damping", steps_per_epoch),
        "factor_decay": kfac.factor_decay,
        "kl_clip": kfac.kl_clip,
        "compute_method": kfac.compute_method,
        "accumulation_steps": cfg.training.accumulation_steps,
        "factor_dtype": DTYPES[kfac.factor_dtype] if kfac.factor_dtype else None,
        "inv_dtype": DTYPES[kfac.inv_dtype],
        "skip_layers": kfac.skip_layers,
        "grad_worker_fraction": kfac.grad_worker_fraction,
        "assignment": kfac.assignment,
        "factor_comm": kfac.factor_comm,
        "symmetric_comm": kfac.symmetric_comm,
        "bucket_cap_mb": kfac.bucket_cap_mb,
    }


@dataclass
class GradientSync:
    """How gradients are averaged over ranks: DDP for torch.distributed, the communicator otherwise."""

    comm: Communicator
    uses_ddp: bool

    def average(self, model: nn.Module) -> None:
        """Average every gradient over ranks when DDP does not (MPI and Horovod back-ends)."""
        if self.uses_ddp or self.comm.world_size == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.allreduce(flat, average=True, category="gradients").wait()
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def wrap_model(model: nn.Module, comm: Communicator, device: torch.device) -> tuple[nn.Module, GradientSync]:
    """DDP-wrap the model when torch.distributed runs the job with several ranks."""
    if isinstance(comm, TorchDistCommunicator) and comm.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), GradientSync(comm, uses_ddp=True)
    return model, GradientSync(comm, uses_ddp=False)
