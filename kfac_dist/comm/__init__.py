"""How bytes move: the `Communicator` interface, its backends, byte accounting, tensor fusion and packing.

This package is the only place in kfac-dist that calls ``torch.distributed``.

`MPICommunicator` (mpi4py) and `HorovodCommunicator` (horovod.torch) are imported on first use: importing
mpi4py initialises MPI, and neither package is a requirement.
"""

from typing import TYPE_CHECKING, Any

from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.comm.base import CollectiveError, Communicator, CompletedHandle, Handle, RendezvousTimeout
from kfac_dist.comm.fusion import FusionPlan, FusionStep
from kfac_dist.comm.layout import (
    Bucket,
    CollectiveOp,
    FusionEntry,
    Group,
    Target,
    build_buckets,
    canonical_group,
    packed_numel,
)
from kfac_dist.comm.local import LocalCommunicator
from kfac_dist.comm.packing import pack_upper, unpack_upper
from kfac_dist.comm.torch_dist import TorchDistCommunicator

if TYPE_CHECKING:
    from kfac_dist.comm.horovod import HorovodCommunicator
    from kfac_dist.comm.mpi import MPICommunicator

_OPTIONAL = {"MPICommunicator": "kfac_dist.comm.mpi", "HorovodCommunicator": "kfac_dist.comm.horovod"}


def __getattr__(name: str) -> Any:
    """Import the optional backends (`MPICommunicator`, `HorovodCommunicator`) when first named."""
    if name in _OPTIONAL:
        import importlib

        return getattr(importlib.import_module(_OPTIONAL[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bucket",
    "CollectiveError",
    "CollectiveOp",
    "Communicator",
    "CompletedHandle",
    "FusionEntry",
    "FusionPlan",
    "FusionStep",
    "Group",
    "Handle",
    "HorovodCommunicator",
    "LocalCommunicator",
    "MPICommunicator",
    "RendezvousTimeout",
    "Target",
    "TorchDistCommunicator",
    "build_buckets",
    "canonical_group",
    "collective_bytes",
    "pack_upper",
    "packed_numel",
    "unpack_upper",
]
