"""Checkpoints (kfac_dist/app/checkpoint.py): round trip, pruning, newest, atomicity under a crash, safe loading."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfac_dist.app.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    CheckpointMismatch,
    CheckpointUnsafe,
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
META = {"model": "resnet50", "config_fingerprint": "abc123"}


def _training_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "preconditioner": {"steps": 7, "factors": {"0": (torch.eye(5), torch.eye(3))}, "compute_method": "eigen"},
        "rng": capture_rng_state(),
        "misc": [None, True, 1.5, b"x", {1, 2}, torch.float16, torch.device("cpu"), torch.Size([2, 3])],
    }


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path: Path) -> None:
    state = _training_state()
    path = save_checkpoint(tmp_path, state, epoch=3, step=120, keep=2, meta=META)
    assert path == tmp_path / "ckpt-epoch0003-step00000120.pt" == tmp_path / checkpoint_name(3, 120)
    loaded = load_checkpoint(path, expected=META)
    assert (loaded["epoch"], loaded["step"], loaded["meta"]) == (3, 120, META)
    _assert_same(state, loaded["state"])
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.load_state_dict(loaded["state"]["model"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in python's state
    path = save_checkpoint(tmp_path, {"rng": capture_rng_state()}, epoch=0, step=0, keep=1)
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["state"]["rng"])
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, {"epoch": epoch}, epoch=epoch, step=10 * epoch, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4, 40), checkpoint_name(5, 50)]
    # saving an older point (e.g. after resuming from an earlier file) never deletes what it just wrote
    older = save_checkpoint(tmp_path, {"epoch": 2}, epoch=2, step=20, keep=1)
    assert list_checkpoints(tmp_path) == [older]
    with pytest.raises(ValueError, match="keep=0 must be an integer >= 1"):
        save_checkpoint(tmp_path, {}, epoch=1, step=1, keep=0)
    with pytest.raises(ValueError, match="step=-1"):
        save_checkpoint(tmp_path, {}, epoch=1, step=-1, keep=1)


def test_latest(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for epoch, step in [(9999, 5), (10000, 6), (2, 7)]:  # numeric order, not string order
        save_checkpoint(tmp_path, {}, epoch=epoch, step=step, keep=10)
    (tmp_path / f".{checkpoint_name(10001, 9)}.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(10000, 6)


CRASHING_SAVE = """
import io, os, signal, sys
import torch
from kfac_dist.app.checkpoint import save_checkpoint

directory = sys.argv[1]
save_checkpoint(directory, {"w": torch.arange(4.0)}, epoch=1, step=10, keep=1, meta={"model": "m"})
real_save = torch.save

def half_then_die(obj, file, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    os.fsync(file.fileno())
    print("wrote", len(data) // 2, "of", len(data), "bytes; dying", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_then_die
save_checkpoint(directory, {"w": torch.zeros(100_000)}, epoch=2, step=20, keep=1, meta={"model": "m"})
print("not reached", flush=True)
"""


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL, output
    assert "wrote" in output and "not reached" not in output, output
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].stat().st_size > 100_000, output  # the half-written file is there
    previous = tmp_path / checkpoint_name(1, 10)
    assert latest_checkpoint(tmp_path) == previous
    assert list_checkpoints(tmp_path) == [previous]
    assert torch.equal(load_checkpoint(previous, expected={"model": "m"})["state"]["w"], torch.arange(4.0))
    # the next save succeeds and clears the crashed writer's temporary file
    save_checkpoint(tmp_path, {"w": torch.ones(1)}, epoch=2, step=20, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(2, 20)]


def test_corrupt_files_name_the_path(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, {"w": torch.zeros(1000)}, epoch=1, step=1, keep=5)
    truncated = tmp_path / checkpoint_name(2, 2)
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / checkpoint_name(3, 3)
    garbage.write_bytes(b"hello world")
    empty = tmp_path / checkpoint_name(4, 4)
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(CheckpointDamaged, match=f"^damaged checkpoint {path}: not a readable zip archive"):
            load_checkpoint(path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a kfac-dist checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Unpickling it calls open(marker, "w"): proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_weights_only_refuses_pickled_objects_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / checkpoint_name(1, 1)
    payload = {"format": "kfac-dist-checkpoint", "version": 1, "epoch": 1, "step": 1, "meta": {}}
    torch.save({**payload, "state": {"evil": _Payload(marker)}}, path)
    with pytest.raises(
        CheckpointUnsafe, match=rf"^unsafe content in checkpoint {path}: .*would call io\.open.*weights_only=True"
    ):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when loaded unsafely
    assert marker.exists()


def test_save_refuses_state_that_could_not_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['scheduler'\]\['last_epoch'\] is a numpy\.int64"):
        save_checkpoint(tmp_path, {"scheduler": {"last_epoch": np.int64(3)}}, epoch=1, step=1, keep=1)
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\] is a numpy\.ndarray"):
        save_checkpoint(tmp_path, {"rng": [1, np.zeros(2)]}, epoch=1, step=1, keep=1)
    with pytest.raises(TypeError, match=r"state\['modules'\] is a torch\.nn\.modules\.linear\.Linear"):
        save_checkpoint(tmp_path, OrderedDict(modules=nn.Linear(1, 1)), epoch=1, step=1, keep=1)
    with pytest.raises(ValueError, match="meta fields must map strings to strings"):
        save_checkpoint(tmp_path, {}, epoch=1, step=1, keep=1, meta={"seed": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_mismatch_names_each_field(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {}, epoch=1, step=1, keep=1, meta=META)
    expected = {"model": "small_cnn", "config_fingerprint": "abc123", "dataset": "mnist"}
    with pytest.raises(CheckpointMismatch) as info:
        load_checkpoint(path, expected=expected)
    message = str(info.value)
    assert str(path) in message
    assert "model: 'resnet50' in the checkpoint, 'small_cnn' in this run" in message
    assert "dataset: absent in the checkpoint, 'mnist' in this run" in message
    assert "config_fingerprint" not in message  # equal fields are not reported
    assert isinstance(info.value, ValueError)
    assert load_checkpoint(path, expected={"model": "resnet50"})["meta"] == META
