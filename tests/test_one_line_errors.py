"""Errors a user can fix stop ``kfac-dist train`` with one line on stderr naming the option or file, exit code 2 (a
config error) or 1 (an error while running), and no traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from app_runs import explain, run_single
from data_fakes import load_synthetic_script

from kfac_dist.app import checkpoint as checkpoint_module
from kfac_dist.app.checkpoint import list_checkpoints, load_checkpoint
from kfac_dist.app.cli import main

FAST = ["logging.tensorboard=false", "data.batch_size=128"]  # 31 steps per epoch on one process


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``kfac-dist train ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(["train", *args])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("kfac-dist train: error") and err.count("\n") == 1, err
    assert "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def test_config_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"training:\n  epochs: 2  # \xe9poques\n")
    code, err = train(capsys, "--config", str(path))
    assert code == 2
    assert_one_line(err, f"{path}: file: is not UTF-8 text")


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_empty_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code, err = train(capsys, "--config", str(path), f"logging.dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_line(err, f"{path}: file: is empty")
    assert not (tmp_path / "run").exists()  # nothing trained


@pytest.mark.parametrize("value", ["1e300", "1e-6"])
def test_timeout_out_of_range(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, err = train(capsys, f"comm.timeout_s={value}")
    assert code == 2
    assert_one_line(err, "comm.timeout_s: ", "is out of range; allowed: a number in [1, 604800]")


def test_fewer_classes_than_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = train(capsys, f"logging.dir={tmp_path}", "model.num_classes=5")
    assert code == 2
    assert_one_line(err, "model.num_classes: 5 is smaller than the 10 classes of data set 'mnist-5k'")


@pytest.mark.parametrize("below", [False, True])
def test_logging_dir_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], below: bool) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a run directory")
    run_dir = blocker / "run" if below else blocker
    code, err = train(capsys, f"logging.dir={run_dir}")
    assert code == 2
    assert_one_line(err, f"logging.dir: {run_dir} ", f"{blocker} is a file" if below else "is a file")
    assert blocker.read_text() == "a file, not a run directory"


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int) -> None:
    root = load_synthetic_script().write_synthetic_imagefolder(
        tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=16
    )
    broken = sorted((root / "train").rglob("*.JPEG"))[1]
    broken.write_bytes(broken.read_bytes()[:40])  # a JPEG header, then nothing: a cut-off copy
    args = [f"data.root={root}", "data.name=imagenet", "data.image_size=8", "data.batch_size=4"]
    code, err = train(capsys, *args, f"data.workers={workers}", "model.name=mlp", f"logging.dir={tmp_path / 'run'}")
    assert code == 1
    assert_one_line(err, f"cannot decode image {broken}")


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def save_onto_a_full_disk(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if obj.get("epoch") != 2:
            real_save(obj, file, *args, **kwargs)
            return

        class FullDisk:  # the file system takes 4 KiB of the second checkpoint, then reports ENOSPC
            written = 0

            def write(self, data: bytes) -> int:
                self.written += len(data)
                if self.written > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return int(file.write(data))

            def flush(self) -> None:
                file.flush()

        real_save(obj, FullDisk(), *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_onto_a_full_disk)
    directory = tmp_path / "checkpoints"
    code, err = train(capsys, f"logging.dir={tmp_path}", *FAST, "training.epochs=3")
    assert code == 1
    assert_one_line(
        err,
        f"cannot write a checkpoint in {directory}: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}",
        "the checkpoints already there are intact",
    )
    (previous,) = list_checkpoints(directory)
    assert load_checkpoint(previous)["epoch"] == 1  # intact and readable
    assert sorted(path.name for path in directory.iterdir()) == [previous.name]  # no partial file left


def test_every_epochs_null_never_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = train(capsys, f"logging.dir={tmp_path}", *FAST, "training.epochs=1", "checkpoint.every_epochs=null")
    assert code == 0, err
    assert list_checkpoints(tmp_path / "checkpoints") == []
    code, err = train(capsys, f"logging.dir={tmp_path}", *FAST, "training.max_steps=2", "checkpoint.every_epochs=null")
    assert code == 0, err
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_separate_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The same through ``python -m kfac_dist.app.train``: what a user sees (the errors raised after start-up)."""
    result = run_single([f"logging.dir={tmp_path}", "model.num_classes=3"], timeout=300)
    assert result.returncode == 2, explain(result)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, explain(result)
    assert "model.num_classes: 3 is smaller than the 10 classes" in result.stderr, explain(result)
