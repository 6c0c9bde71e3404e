"""Distributed data loaders: per-rank shards, per-epoch shuffles, workers, pinned memory, reproducible augmentation.

Training: a :class:`KeyedDistributedSampler` (torch's ``DistributedSampler`` with ``shuffle=True``, ``seed`` and
``drop_last=True``) gives every rank a disjoint shard of ``len(dataset) // world_size`` samples, and the loader
drops the last partial batch, so every rank runs the same number of steps with the same local batch size (K-FAC
averages factors across ranks assuming equal local batches). **The caller must call**
``train_sampler.set_epoch(epoch)`` **before each epoch**, or every epoch repeats the same order.

Reproducible augmentation: for datasets that accept :class:`~kfac_dist.app.data.transforms.SampleKey` (the ImageNet and
CIFAR datasets here), the sampler yields ``SampleKey(index, mix_seed(seed, epoch))`` and the dataset seeds each
sample's augmentation from ``(seed, epoch, index)``: identical for any rank count, worker count, or resume point.
Other datasets get plain indices; their random transforms use the worker's global RNG, which ``worker_init_fn``
seeds from ``(seed, rank, worker_id)`` (torch, ``random`` and numpy), so a run is reproducible as a whole. The
loaders carry their own ``torch.Generator``, so building or iterating them never consumes the global RNG.

Stop signals: Slurm sends SIGTERM to every process of a job (time limit, preemption, ``scancel``), and torchrun to
its ranks' process groups, loader workers included. PyTorch's worker handler ends a worker on a SIGTERM from any
process but its rank, which then fails; ``worker_init_fn`` makes workers ignore those instead, so the rank reaches
its next stop check and writes its checkpoint (:mod:`kfac_dist.app.preemption`). A SIGTERM from the rank itself
(``terminate()`` at shutdown) still ends a worker at once, a worker whose rank died ends itself (PyTorch's watchdog,
within 5 s), and SIGKILL ends it as ever.

Validation: :class:`ShardSampler` gives rank ``r`` the samples ``r, r + world_size, ...`` without padding or
dropping, so every sample is evaluated exactly once. Ranks may then have different numbers of batches: do not run
collectives per batch; accumulate sums and counts (e.g. correct predictions, summed loss, number of samples) and
all-reduce them once at the end.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from kfac_dist.app.data.transforms import SampleKey, mix_seed

__all__ = [
    "DATASET_NAMES",
    "KeyedDistributedSampler",
    "Loaders",
    "ShardSampler",
    "build_datasets",
    "build_loaders",
    "build_mnist_5k",
]

DATASET_NAMES = ("mnist-5k", "cifar10", "imagenet")


class KeyedDistributedSampler(DistributedSampler[Any]):
    """``DistributedSampler`` that yields :class:`SampleKey` s (``keyed=True``) or plain indices.

    With ``keyed=True`` each index ``i`` comes as ``SampleKey(i, mix_seed(seed, epoch))``; the order and the
    shards are exactly those of ``DistributedSampler`` with the same arguments.
    """

    def __init__(self, dataset: Sized, *, keyed: bool, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)  # type: ignore[arg-type]
        self.keyed = keyed

    def __iter__(self) -> Iterator[Any]:
        indices = super().__iter__()
        if not self.keyed:
            return indices
        epoch_seed = mix_seed(self.seed, self.epoch)
        return (SampleKey(int(i), epoch_seed) for i in indices)


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s strided shard ``rank, rank + world_size, ...`` of ``range(len(dataset))``, in order.

    No padding and no dropping: the shards partition the data set exactly (their lengths differ by at most one).
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        _check_rank(rank, world_size)
        self.size = len(dataset)
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class Loaders(NamedTuple):
    """What :func:`build_loaders` returns."""

    train: DataLoader[Any]
    val: DataLoader[Any]
    train_sampler: KeyedDistributedSampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")


def _seed_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """Seed a loader worker's global RNGs (torch, ``random``, numpy) from ``(seed, rank, worker_id)``."""
    worker_seed = mix_seed(seed, rank, worker_id)
    torch.manual_seed(worker_seed)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)


def _init_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """A loader worker's ``worker_init_fn``: seed its RNGs, and leave SIGTERM from other processes to its rank."""
    _seed_worker(worker_id, seed=seed, rank=rank)
    # Blocked here, before the worker starts any thread, SIGTERM is blocked in all of them (threads inherit the mask)
    # and reaches only the watcher's sigwaitinfo.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_watch_sigterm, args=(os.getppid(),), name="sigterm-watch", daemon=True).start()


def _watch_sigterm(parent: int) -> None:
    """Exit on a SIGTERM from ``parent`` (the rank's ``terminate()``), as PyTorch's worker handler does; drop others."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # Slurm's (sent to every process of a job) or torchrun's (to a rank's process group): the rank stops
    os._exit(0)


def build_loaders(
    train_ds: Dataset[Any],
    val_ds: Dataset[Any],
    *,
    batch_size: int,
    val_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Loaders:
    """Build this rank's training and validation loaders (see the module docstring for the guarantees).

    Args:
        train_ds: Training set (sized, map-style).
        val_ds: Validation set (sized, map-style).
        batch_size: Local (per-rank) training batch size.
        val_batch_size: Local validation batch size; default ``batch_size``.
        rank: This process's rank.
        world_size: Number of ranks.
        workers: Loader worker processes per rank (0: load in the main process); workers are persistent.
        seed: Seed of the shuffles and the augmentation; must be the same on every rank.
        device: The training device; batches go to pinned memory only when it is CUDA.

    Returns:
        ``(train, val, train_sampler)``; call ``train_sampler.set_epoch(epoch)`` before each epoch.

    Raises:
        ValueError: For an invalid rank, batch size or worker count, or if a rank's shard of ``train_ds`` is
            smaller than one batch.
    """
    _check_rank(rank, world_size)
    val_batch_size = batch_size if val_batch_size is None else val_batch_size
    if batch_size < 1 or val_batch_size < 1 or workers < 0:
        raise ValueError(f"need batch sizes >= 1 and workers >= 0; got {batch_size}, {val_batch_size}, {workers}")
    train_sized, val_sized = _sized(train_ds, "train_ds"), _sized(val_ds, "val_ds")
    train_sampler = KeyedDistributedSampler(
        train_sized,
        keyed=bool(getattr(train_ds, "accepts_sample_keys", False)),
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    if train_sampler.num_samples < batch_size:
        raise ValueError(
            f"each of {world_size} rank(s) gets {train_sampler.num_samples} of the {len(train_sized)} training "
            f"samples, fewer than the local batch size {batch_size}"
        )
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": torch.device(device).type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": functools.partial(_init_worker, seed=seed, rank=rank) if workers > 0 else None,
    }
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=train_sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank, 0)),
        **common,
    )
    val = DataLoader(
        val_ds,
        batch_size=val_batch_size,
        sampler=ShardSampler(val_sized, rank, world_size),
        drop_last=False,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank, 1)),
        **common,
    )
    return Loaders(train, val, train_sampler)


def _sized(dataset: Dataset[Any], name: str) -> Sized:
    if not isinstance(dataset, Sized):
        raise TypeError(f"{name} must be a map-style data set with a length; got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty ({dataset!r})")
    return dataset


def build_mnist_5k(seed: int = 0) -> tuple[TensorDataset, TensorDataset, int]:
    """MNIST-5k (:func:`kfac_dist.app.data.mnist.load_mnist_5k`, normalised): ``(train, test, 10)`` tensor data."""
    from kfac_dist.app.data.mnist import load_mnist_5k

    train, test = load_mnist_5k(seed=seed)
    return TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels), 10


def build_datasets(
    name: str, root: str | os.PathLike[str] | None = None, *, image_size: int = 224, seed: int = 0
) -> tuple[Dataset[Any], Dataset[Any], int]:
    """Build ``(train, val, num_classes)`` for a data set by name.

    Args:
        name: One of :data:`DATASET_NAMES`: ``"mnist-5k"`` (embedded; ``root`` unused), ``"cifar10"`` (python
            batches under ``root``) or ``"imagenet"`` (ImageFolder tree under ``root``).
        root: The data directory (required for ``cifar10`` and ``imagenet``).
        image_size: ImageNet crop size.
        seed: MNIST-5k split seed.

    Raises:
        ValueError: For an unknown name or a missing ``root``.
        FileNotFoundError: If the data directory or its files are missing (the message names the path).
    """
    if name == "mnist-5k":
        return build_mnist_5k(seed)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if root is None:
        raise ValueError(f"data set {name!r} needs a data directory (root)")
    if name == "cifar10":
        from kfac_dist.app.data.cifar import build_cifar10

        return build_cifar10(root)
    from kfac_dist.app.data.imagenet import build_imagenet

    return build_imagenet(root, image_size=image_size)
