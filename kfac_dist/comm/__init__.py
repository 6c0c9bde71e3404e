"""How bytes move: the `Communicator` interface, its backends, tensor fusion and triangular packing.

This package is the only place in kfac-dist that calls ``torch.distributed``.
"""

from kfac_dist.comm.base import Communicator, CompletedHandle, Group, Handle, canonical_group
from kfac_dist.comm.fusion import Bucket, CollectiveOp, FusionEntry, FusionPlan, FusionStep, Target
from kfac_dist.comm.local import LocalCommunicator
from kfac_dist.comm.packing import pack_upper, packed_numel, unpack_upper
from kfac_dist.comm.torch_dist import TorchDistCommunicator

__all__ = [
    "Bucket",
    "CollectiveOp",
    "Communicator",
    "CompletedHandle",
    "FusionEntry",
    "FusionPlan",
    "FusionStep",
    "Group",
    "Handle",
    "LocalCommunicator",
    "Target",
    "TorchDistCommunicator",
    "canonical_group",
    "pack_upper",
    "packed_numel",
    "unpack_upper",
]
