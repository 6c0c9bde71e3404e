"""The communicator backends, one row each: the names ``comm.backend`` takes and what each one is.

The application reads this table for its config's choices (``("auto", *BACKENDS)``), for the process group it
starts (:func:`kfac_dist.app.env.init_distributed`) and for the communicator it builds. Adding a backend is one
`Communicator` subclass plus one row here.

`MPICommunicator` (mpi4py) and `HorovodCommunicator` (horovod.torch) are imported only when their row's
`Backend.communicator` is called: importing mpi4py initialises MPI, and neither package is a requirement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kfac_dist.comm.base import Communicator
from kfac_dist.comm.local import LocalCommunicator
from kfac_dist.comm.torch_dist import TorchDistCommunicator

__all__ = ["AUTO", "BACKENDS", "Backend", "resolve_backend"]

#: The name that picks a backend for the machine: NCCL with CUDA, else gloo (:func:`resolve_backend`).
AUTO = "auto"


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One communicator backend.

    Attributes:
        name: Its name in configs (``comm.backend``).
        torch_distributed: K-FAC's collectives run on a default ``torch.distributed`` process group of this name,
            which the application starts (a `TorchDistCommunicator`; DDP averages the gradients). False: the
            backend brings its own runtime (mpi4py, Horovod), and the application starts no process group.
        devices: The device types whose tensors its collectives take.
        communicator: Builds this rank's `Communicator`; imports an optional package only when called.
        process_group: ``torch.distributed`` itself has a backend of this name that
            :func:`kfac_dist.app.env.init_distributed` can start (for ``mpi``: torch's own MPI process group, when
            torch is built with MPI, not mpi4py).
        missing: Why this torch cannot start that process group here (a phrase after ``backend='name'``), or None.
        rendezvous: The process group meets at the launcher's ``tcp://`` address; False: it takes rank and world
            size from its own runtime (MPI).
    """

    name: str
    torch_distributed: bool
    devices: tuple[str, ...]
    communicator: Callable[[], Communicator]
    process_group: bool = False
    missing: Callable[[], str | None] = _always_available
    rendezvous: bool = True


def _torch_communicator() -> Communicator:
    """The default process group's communicator; a one-rank `LocalCommunicator` when there is none."""
    return TorchDistCommunicator() if dist.is_available() and dist.is_initialized() else LocalCommunicator()


def _mpi_communicator() -> Communicator:
    from kfac_dist.comm.mpi import MPICommunicator

    return MPICommunicator()


def _horovod_communicator() -> Communicator:
    from kfac_dist.comm.horovod import HorovodCommunicator

    return HorovodCommunicator()


def _nccl_missing() -> str | None:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return None
    return "needs CUDA and NCCL, which this torch lacks here"


def _torch_mpi_missing() -> str | None:
    return None if dist.is_mpi_available() else "needs a torch built with MPI, which this one is not"


#: The backends by name, in the order configs and error messages list them.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("nccl", True, ("cuda",), _torch_communicator, process_group=True, missing=_nccl_missing),
        Backend("gloo", True, ("cpu", "cuda"), _torch_communicator, process_group=True),
        Backend(
            "mpi",
            False,
            ("cpu", "cuda"),
            _mpi_communicator,
            process_group=True,
            missing=_torch_mpi_missing,
            rendezvous=False,
        ),
        Backend("horovod", False, ("cpu", "cuda"), _horovod_communicator),
    )
}


def resolve_backend(name: str, cuda: bool) -> Backend:
    """The row `name` stands for: :data:`AUTO` is ``nccl`` when `cuda`, else ``gloo``.

    Raises:
        KeyError: `name` is neither :data:`AUTO` nor a row of :data:`BACKENDS`.
    """
    return BACKENDS[("nccl" if cuda else "gloo") if name == AUTO else name]
