"""The library's step with the model, its inputs and all of K-FAC's state on a device other than the CPU.

The device is `device_tag.TaggedDevice`: tensors that report ``device == meta`` and compute for real on the CPU
(a fake CUDA device does not work for this on a CPU-only build: see device_tag's docstring). Every operator
refuses to mix them with CPU tensors, and the communicator serves the tagged device only, so these tests fail
where K-FAC, on a GPU, would:
- combine a model tensor with one it created on the CPU (``torch.tensor(...)``, ``torch.zeros(...)`` without
  ``device=``, an ``eye`` or a scalar tensor), in capture, factor reduction, running averages, eigen or inverse
  decompositions, preconditioning, KL-clip, writing ``.grad``, state_dict or load_state_dict; 0-dim CPU tensors
  included, which CUDA would accept at the price of a copy;
- keep state loaded from a CPU checkpoint (``torch.load(map_location="cpu")``) on the CPU;
- hand a collective a tensor that is not on the model's device (W = 1 and W = 2 over gloo);
- leave factors, decompositions, gradients or the state_dict's tensors on the CPU (checked after the steps).
And the results equal a plain CPU run's exactly, so the tagged run computed for real.

They do not catch: CPU tensors K-FAC makes and uses only on the host (harmless); code that branches on
``device.type == "cuda"`` (the profiler's synchronisation); NCCL streams and ordering; mixing two GPUs
(``cuda:0`` with ``cuda:1``); operators a CUDA build lacks for a dtype. Host syncs are counted, not limited.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from device_tag import DEVICE, DeviceMixError, TaggedDevice, is_tagged, untag
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator
from kfac_dist.entries import DECOMPOSITION_BROADCAST, GRADIENT_BROADCAST

BATCH = 6


class Net(nn.Module):
    """Every kind of layer K-FAC supports: Embedding (diagonal A), Conv1d, Conv2d, Linear."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4, device=device)
        self.conv1 = nn.Conv1d(4, 3, 3, device=device)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, groups=1, device=device)
        self.head = nn.Linear(3 * 4 + 3 * 5 * 5, 5, device=device)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(self.embed(tokens).transpose(1, 2)))
        b = torch.relu(self.conv2(image))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], dim=1))


def _batch(step: int, rank: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    tokens = torch.randint(0, 10, (BATCH, 6), generator=generator)
    image = torch.randn(BATCH, 2, 5, 5, generator=generator)
    labels = torch.randint(0, 5, (BATCH,), generator=generator)
    return tokens.to(device), image.to(device), labels.to(device)


def _train(
    model: Net, pre: KFACPreconditioner, device: torch.device | str, steps: range, rank: int = 0, world: int = 1
) -> None:
    for step in steps:
        tokens, image, labels = _batch(step, rank, device)
        model.zero_grad()
        nn.functional.cross_entropy(model(tokens, image), labels).backward()
        if world > 1:
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        pre.step()


def _preconditioner(model: Net, comm: Communicator, method: str, fraction: float = 1.0) -> KFACPreconditioner:
    return KFACPreconditioner(
        model, communicator=comm, compute_method=method, inv_update_steps=2, grad_worker_fraction=fraction, lr=0.05
    )


def _state_tensors(pre: KFACPreconditioner, model: Net) -> list[torch.Tensor]:
    """Every tensor of K-FAC's state on this rank and every gradient."""
    tensors = [t for pair in pre.factors().values() for t in pair]
    tensors += [t for s in pre._states.values() if s.decomposition for t in s.decomposition.tensors.values()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return tensors


def _flat(state: dict[str, Any]) -> list[torch.Tensor]:
    return [t for group in ("factors", "decompositions") for fields in state[group].values() for t in fields.values()]


def test_tagged_device_refuses_a_cpu_scalar_next_to_device_tensors() -> None:
    """The helper can fail: the metric-sum bug of the training loop (a CPU scalar stacked with device sums)."""
    with TaggedDevice(), pytest.raises(DeviceMixError, match=r"aten.stack.default: tensors on meta mixed with tensors"):
        loss = torch.ones(3, device=DEVICE).sum()
        torch.stack([loss, torch.tensor(float(BATCH))])
    with TaggedDevice(), pytest.raises(DeviceMixError, match="aten.add"):
        torch.ones(3, device=DEVICE) + torch.zeros(3)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_step_state_dict_and_load_keep_everything_on_the_model_device(method: str) -> None:
    cpu_model = Net("cpu")
    cpu_pre = _preconditioner(cpu_model, LocalCommunicator(), method)
    _train(cpu_model, cpu_pre, "cpu", range(3))
    cpu_state = cpu_pre.state_dict()
    _train(cpu_model, cpu_pre, "cpu", range(3, 5))

    with TaggedDevice() as mode:
        model = Net(DEVICE)
        pre = _preconditioner(model, LocalCommunicator(devices=[DEVICE]), method)
        _train(model, pre, DEVICE, range(3))
        state = pre.state_dict()
        assert all(is_tagged(t) for t in _state_tensors(pre, model) + _flat(state))
        for mine, reference in zip(_flat(state), _flat(cpu_state), strict=True):
            assert torch.equal(untag(mine), reference)

        # A state loaded from a checkpoint on the CPU, into a fresh run: it continues on the device (step 3 is
        # not an inverse step, so the loaded decompositions precondition it).
        resumed_model = Net(DEVICE)
        resumed_model.load_state_dict(model.state_dict())
        resumed = _preconditioner(resumed_model, LocalCommunicator(devices=[DEVICE]), method)
        resumed.load_state_dict(untag(state))
        _train(resumed_model, resumed, DEVICE, range(3, 5))
        assert all(is_tagged(t) for t in _state_tensors(resumed, resumed_model))
    assert mode.ops  # the step did run on the tagged device
    for p, q in zip(resumed_model.parameters(), cpu_model.parameters(), strict=True):
        assert torch.equal(untag(p.grad), q.grad)


def _two_ranks(rank: int, world: int, method: str) -> None:
    """Plain CPU and tagged runs of W = 2: owners reduce factors; with one grad worker per layer (f = 0.5) the
    preconditioned gradients are broadcast, with two (f = 1) the decompositions are. Fails on a rank that differs."""
    for fraction in (0.5, 1.0):
        cpu_model = Net("cpu")
        cpu_pre = _preconditioner(cpu_model, TorchDistCommunicator(), method, fraction)
        _train(cpu_model, cpu_pre, "cpu", range(3), rank, world)
        with TaggedDevice():
            model = Net(DEVICE)
            pre = _preconditioner(model, TorchDistCommunicator(devices=[DEVICE]), method, fraction)
            _train(model, pre, DEVICE, range(3), rank, world)
            state = pre.state_dict()
            assert all(is_tagged(t) for t in _state_tensors(pre, model) + _flat(state))
        broadcast = DECOMPOSITION_BROADCAST if fraction == 1.0 else GRADIENT_BROADCAST
        assert sum(pre.comm_stats()[broadcast].values()) > 0
        for p, q in zip(model.parameters(), cpu_model.parameters(), strict=True):
            assert torch.equal(untag(p.grad), q.grad), (rank, fraction)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_two_ranks_over_gloo_keep_everything_on_the_model_device(method: str) -> None:
    run_multiproc(_two_ranks, 2, method)  # every rank's checks; a failure or a timeout fails the test
