"""The training loop on a device that is not the host, without a GPU: the model and batches on the ``meta`` device.

What this catches (the bugs that crashed the app's first CUDA step, and their kind):

- an operator that mixes a host tensor with training-device tensors in the trainer's step, logging or validation
  (``torch.stack([cuda_loss, torch.tensor(n)])``): meta tensors refuse most such mixes, and :class:`DeviceStrictMode`
  refuses every one, even those meta lets through and CUDA does not (an in-place add of a CPU vector);
- a host read (``.item()``, ``.tolist()``, ``.cpu()``) anywhere in the loop other than
  :func:`kfac_dist.app.run_report.host_values`: meta tensors have no data, so any other read raises; the reads through
  ``host_values`` are counted, so a read per step (instead of per logging interval) fails the count;
- a tensor handed to a collective on another device than the communicator's (a CPU tensor under NCCL): the
  communicator here accepts meta tensors only (``LocalCommunicator(devices=...)``), as NCCL accepts CUDA ones.

What it does not catch: the library's K-FAC step (it reads flags to the host by design, so it runs with
``kfac.enabled: false`` here; the library's device handling is covered by its own tests and the GPU smoke script),
DDP, mixed precision (no autocast on meta; fp16 needs CUDA), and CUDA-only behaviour: streams, pinned memory,
``non_blocking`` copies, NCCL itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kfac_dist.app import run_report
from kfac_dist.app import trainer as trainer_module
from kfac_dist.app.config import load_config
from kfac_dist.app.env import RunEnv
from kfac_dist.comm import Handle, LocalCommunicator

META = torch.device("meta")
SINGLE = RunEnv("single", 0, 1, 0, 1, "127.0.0.1", 29500)
aten = torch.ops.aten
#: Operators that move data between devices on purpose (``x.to(device)``).
COPIES = {aten._to_copy.default, aten.copy_.default}


class DeviceStrictMode(TorchDispatchMode):
    """Fails any operator whose tensor arguments live on more than one device, copies excepted."""

    def __torch_dispatch__(
        self, func: Any, types: Sequence[type], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in COPIES:
            leaves = pytree.tree_leaves((args, kwargs))
            devices = {str(leaf.device) for leaf in leaves if isinstance(leaf, torch.Tensor)}
            if len(devices) > 1:
                raise AssertionError(f"{func} mixes tensors on devices {sorted(devices)}")
        return func(*args, **kwargs)


class RecordingCommunicator(LocalCommunicator):
    """One rank that accepts tensors on ``device`` only (the library's device check, as NCCL's) and records calls."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(devices=[device])
        self.calls: list[tuple[str, str]] = []

    def allreduce(
        self, tensor: torch.Tensor, group: Sequence[int] | None = None, *, average: bool, category: str
    ) -> Handle:
        """Allreduce (the device is checked there), then record the call."""
        handle = super().allreduce(tensor, group, average=average, category=category)
        self.calls.append(("allreduce", category))
        return handle


class MetaRun:
    """Trainers whose model and batches live on the meta device, with every host read of metrics recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.comm = RecordingCommunicator(META)
        self.reads: list[tuple[int, str]] = []  # (global step, device of the tensor read)
        self.trainer: trainer_module.Trainer | None = None
        monkeypatch.setattr(trainer_module, "resolve_device", lambda cfg, env: META)
        monkeypatch.setattr(trainer_module, "make_communicator", lambda cfg: self.comm)
        monkeypatch.setattr(run_report, "host_values", self._host_values)

    def _host_values(self, tensor: torch.Tensor) -> list[float]:
        assert self.trainer is not None
        self.reads.append((self.trainer.position.global_step, str(tensor.device)))
        return [0.0] * tensor.numel()  # meta tensors have no values

    def make(self, tmp_path: Path, *overrides: str) -> trainer_module.Trainer:
        """A trainer of the default config without K-FAC, logging every 2 steps."""
        args = [f"logging.dir={tmp_path}", "kfac.enabled=false", "training.log_every_steps=2", *overrides]
        self.trainer = trainer_module.Trainer(load_config(None, args), SINGLE)
        assert next(self.trainer.model.parameters()).device == META
        return self.trainer


@pytest.fixture
def meta_run(monkeypatch: pytest.MonkeyPatch) -> MetaRun:
    """See :class:`MetaRun`."""
    return MetaRun(monkeypatch)


def test_the_training_loop_keeps_metrics_on_the_device_and_reads_them_once_per_interval(
    tmp_path: Path, meta_run: MetaRun
) -> None:
    trainer = meta_run.make(tmp_path, "training.max_steps=5", "checkpoint.every_epochs=null")
    # (no checkpoint: a save first checks on the host that the state is finite, which meta tensors cannot show)
    with DeviceStrictMode():
        result = trainer.run()
    assert result.steps == 5
    # Steps 2 and 4 log: the local sums, then the ranks' agreement on non-finite values and on stop signals (one
    # allreduce each). At the stop (step 5): the epoch's training sums, the non-finite agreement, the validation sums.
    # Nothing is read or reduced at steps 1 and 3.
    per_interval = [("allreduce", "metrics")] * 2
    assert meta_run.reads == [(2, "meta")] * 3 + [(4, "meta")] * 3 + [(5, "meta")] * 3
    assert meta_run.comm.calls == per_interval * 2 + [("allreduce", "metrics")] * 3


def test_validation_sums_stay_on_the_device(tmp_path: Path, meta_run: MetaRun) -> None:
    trainer = meta_run.make(tmp_path)
    with DeviceStrictMode():
        trainer.validate()
    assert meta_run.reads == [(0, "meta")]  # one read, after the allreduce
    assert meta_run.comm.calls == [("allreduce", "metrics")]


def test_the_checks_catch_the_bugs_of_the_first_cuda_run() -> None:
    """The lines that crashed (or would have crashed) on CUDA fail here: these checks can fail."""
    loss = torch.zeros((), device=META)
    for strict in (False, True):  # the original per-step sums: meta alone refuses them, and so does the mode
        with pytest.raises(AssertionError if strict else RuntimeError, match="device"):
            with DeviceStrictMode() if strict else contextlib.nullcontext():
                torch.stack([loss * 32, torch.tensor(32.0)])
    with pytest.raises(AssertionError, match="mixes tensors"), DeviceStrictMode():
        torch.zeros(3, device=META).add_(torch.zeros(3))  # meta allows it, CUDA does not
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss.item()  # the original validation's per-batch .item()
    with pytest.raises(ValueError, match="tensor on cpu"):
        RecordingCommunicator(META).allreduce(torch.zeros(4), average=False, category="metrics")
