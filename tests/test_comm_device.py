"""Every tensor handed to a collective must be on the communicator's device: a clear error, before anything runs.

What these tests catch without a GPU: a tensor handed to `allreduce`, `reduce`, `broadcast` or `allgather` that
is not on a device the communicator serves (e.g. a CPU metrics sum under NCCL, which NCCL refuses with a C++
error or a hang at W > 1), at any world size, including W = 1 where no collective runs; the device index
(``cuda:1`` under a communicator bound to ``cuda:0``, with fake CUDA tensors). What they do not catch: NCCL's
own rule is read from a real NCCL process group (``backend_devices``), which needs a GPU; only gloo's is checked
here.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_multiproc
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator


def _every_op(comm: Communicator, tensor: torch.Tensor) -> None:
    comm.allreduce(tensor, average=True, category="metrics").wait()
    comm.reduce(tensor, 0, average=False, category="metrics").wait()
    comm.broadcast(tensor, 0, category="metrics").wait()
    handle, _ = comm.allgather(tensor, category="metrics")
    handle.wait()


@pytest.mark.parametrize("op", ["allreduce", "reduce", "broadcast", "allgather"])
def test_a_tensor_off_the_communicators_device_is_refused_naming_op_category_and_devices(op: str) -> None:
    comm = LocalCommunicator(devices=["meta"])
    calls = {
        "allreduce": lambda t: comm.allreduce(t, average=True, category="metrics"),
        "reduce": lambda t: comm.reduce(t, 0, average=True, category="metrics"),
        "broadcast": lambda t: comm.broadcast(t, 0, category="metrics"),
        "allgather": lambda t: comm.allgather(t, category="metrics"),
    }
    message = rf"^{op}\(category='metrics'\): tensor on cpu, but the local communicator needs meta tensors$"
    with pytest.raises(ValueError, match=message):
        calls[op](torch.zeros(3))
    assert comm.stats() == {}  # refused before anything was recorded
    calls[op](torch.zeros(3, device="meta"))
    assert comm.stats() == {"metrics": {"sent": 0, "received": 0}}


def test_default_local_communicator_takes_any_device() -> None:
    comm = LocalCommunicator()
    assert comm.devices is None
    for device in ("cpu", "meta"):
        _every_op(comm, torch.zeros(3, device=device))


def test_device_index_is_checked_where_given_and_any_index_matches_a_bare_type() -> None:
    with FakeTensorMode():  # fake CUDA tensors: device metadata without a GPU
        on_gpu1 = torch.zeros(3, device="cuda:1")
        _every_op(LocalCommunicator(devices=["cuda"]), on_gpu1)
        _every_op(LocalCommunicator(devices=["cpu", "cuda:1"]), on_gpu1)
        strict = LocalCommunicator(devices=["cuda:0"])
        with pytest.raises(ValueError, match=r"tensor on cuda:1, but the local communicator needs cuda:0 tensors"):
            strict.allreduce(on_gpu1, average=False, category="metrics")
        with pytest.raises(ValueError, match=r"tensor on cpu, but the local communicator needs cuda:0 tensors"):
            strict.broadcast(torch.zeros(3), 0, category="metrics")


def test_devices_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="devices must name at least one device"):
        LocalCommunicator(devices=[])


def test_preconditioner_with_a_device_strict_communicator_names_the_first_offending_collective() -> None:
    """A K-FAC step whose model is on the CPU, under a communicator that serves another device only: the first
    collective (the factor reduction, launched from a backward hook) fails with the clear error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pre = KFACPreconditioner(model, communicator=LocalCommunicator(devices=["meta"]))
    loss = nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 1]))
    message = r"^reduce\(category='factor_reduce'\): tensor on cpu, but the local communicator needs meta tensors$"
    with pytest.raises(ValueError, match=message):
        loss.backward()
        pre.step()


def _gloo_worker(rank: int, world: int) -> tuple[tuple[str, ...] | None, str, str]:
    comm = TorchDistCommunicator()
    devices = None if comm.devices is None else tuple(str(d) for d in comm.devices)
    try:  # refused on every rank before any collective starts, so the ranks stay in step
        comm.allreduce(torch.zeros(3, device="meta"), average=True, category="metrics")
        error = ""
    except ValueError as refused:
        error = str(refused)
    t = torch.full((3,), float(rank + 1))
    comm.allreduce(t, average=False, category="metrics").wait()  # the next collective still matches up
    assert torch.equal(t, torch.full((3,), float(sum(range(1, world + 1)))))
    return devices, comm.name, error


def test_gloo_communicator_serves_cpu_and_cuda_and_refuses_other_devices_on_every_rank() -> None:
    for devices, name, error in run_multiproc(_gloo_worker, 2):
        assert devices == ("cpu", "cuda")
        assert name == "gloo"
        assert error == (
            "allreduce(category='metrics'): tensor on meta, but the gloo communicator needs cpu or cuda tensors"
        )
