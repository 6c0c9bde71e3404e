"""Verified checkpoints: a content digest checked on load, messages that say what is wrong, and resume: auto falling
back past a damaged newest checkpoint."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import torch
from app_runs import explain, run_single

from kfac_dist.app.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    CheckpointUnsafe,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest_usable,
    save_checkpoint,
)

SMALL = ["logging.tensorboard=false", "training.log_every_steps=10"]


def damage(path: Path, start: int, count: int = 4096) -> None:
    """Invert `count` bytes of `path` from `start` (a negative start counts from the middle of the file)."""
    data = bytearray(path.read_bytes())
    begin = len(data) // 2 if start < 0 else start
    for i in range(begin, begin + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_tensor_bytes_are_refused_not_loaded_as_nan(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.zeros(100_000)}, epoch=1, step=1, keep=1)
    damage(path, -1)
    torch.load(path, weights_only=True)  # torch itself loads the damaged bytes silently
    with pytest.raises(CheckpointDamaged, match=rf"^damaged checkpoint {path}: record \S+/data/0 fails its CRC-32"):
        load_checkpoint(path)


def test_damaged_header_is_reported_as_damage(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.zeros(1000)}, epoch=1, step=1, keep=1)
    damage(path, 30, 100)
    with pytest.raises(CheckpointDamaged, match=rf"^damaged checkpoint {path}: ") as info:
        load_checkpoint(path)
    assert "other than tensors" not in str(info.value)


def test_content_that_does_not_match_its_digest_is_damaged(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.zeros(10)}, epoch=1, step=1, keep=1)
    payload = torch.load(path, weights_only=True)
    payload["state"]["w"][3] = 1.0  # as if damaged before the zip CRCs were computed (e.g. copied through bad RAM)
    torch.save(payload, path)
    with pytest.raises(CheckpointDamaged, match=rf"damaged checkpoint {path}: its content does not match its sha256"):
        load_checkpoint(path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class _System:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("evil", ["open", "system"])
def test_malicious_pickle_is_unsafe_content_without_advice_to_load_it_unsafely(tmp_path: Path, evil: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / checkpoint_name(1, 1)
    payload = {"format": "kfac-dist-checkpoint", "version": 2, "epoch": 1, "step": 1, "meta": {}}
    torch.save({**payload, "state": {"x": _Payload(marker) if evil == "open" else _System()}}, path)
    with pytest.raises(CheckpointUnsafe, match=rf"^unsafe content in checkpoint {path}: .*it would call \S+") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "weights_only=False" not in message and "corrupt" not in message and "\n" not in message
    assert not marker.exists()


def test_version_1_checkpoints_load_and_are_verified_by_their_crcs(tmp_path: Path) -> None:
    old = {"format": "kfac-dist-checkpoint", "version": 1, "epoch": 1, "step": 5, "meta": {}}
    path = tmp_path / checkpoint_name(1, 5)
    torch.save({**old, "state": {"w": torch.arange(50_000.0)}}, path)
    assert torch.equal(load_checkpoint(path)["state"]["w"], torch.arange(50_000.0))
    lines: list[str] = []
    found = load_latest_usable(tmp_path, report=lines.append)
    assert found is not None and found[0] == path
    assert lines == [f"checkpoint.resume=auto: {path} predates content digests (version 1): verified by zip CRCs only"]
    damage(path, -1)
    with pytest.raises(CheckpointDamaged, match="fails its CRC-32 check"):
        load_checkpoint(path)


def test_an_old_nonfinite_checkpoint_is_passed_over(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, {"model": {"w": torch.ones(2)}}, epoch=1, step=10, keep=5)
    nan = tmp_path / checkpoint_name(2, 20)  # as an older kfac-dist wrote them after the loss diverged
    old = {"format": "kfac-dist-checkpoint", "version": 1, "epoch": 2, "step": 20, "meta": {}}
    torch.save({**old, "state": {"model": {"w": torch.tensor([1.0, float("nan")])}}}, nan)
    with pytest.raises(CheckpointDamaged, match=r"state\['model'\]\['w'\] holds non-finite values"):
        load_checkpoint(nan)
    lines: list[str] = []
    found = load_latest_usable(tmp_path, report=lines.append)
    assert found is not None and found[0] == good
    assert len(lines) == 1 and f"skipping unusable checkpoint {nan}: state['model']['w'] holds non-finite" in lines[0]


def test_latest_usable_falls_back_and_fails_when_nothing_is_usable(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, {"w": torch.zeros(20_000)}, epoch=1, step=10, keep=5)
    second = save_checkpoint(tmp_path, {"w": torch.ones(20_000)}, epoch=2, step=20, keep=5)
    damage(second, -1)
    lines: list[str] = []
    found = load_latest_usable(tmp_path, report=lines.append)
    assert found is not None and found[0] == first and torch.equal(found[1]["state"]["w"], torch.zeros(20_000))
    assert len(lines) == 1 and f"skipping damaged checkpoint {second}: record" in lines[0], lines
    first.write_bytes(first.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=rf"none of the 2 checkpoints in {tmp_path} is usable"):
        load_latest_usable(tmp_path, report=lines.append)
    assert f"skipping damaged checkpoint {first}: not a readable zip archive" in lines[-1]
    assert load_latest_usable(tmp_path / "empty", report=lines.append) is None


def test_save_writes_a_digest_that_load_checks(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.arange(4.0), "n": [1, "a", None]}, epoch=1, step=1, keep=1)
    payload = load_checkpoint(path)
    assert payload["version"] == 2 and len(payload["sha256"]) == 64
    with zipfile.ZipFile(path) as archive:  # still a plain torch zip archive
        assert archive.testzip() is None
    assert torch.load(io.BytesIO(path.read_bytes()), weights_only=True)["sha256"] == payload["sha256"]


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    for steps in (20, 40):
        args = [f"logging.dir={tmp_path}", *SMALL, f"training.max_steps={steps}", "checkpoint.resume=auto"]
        result = run_single(args)
        assert result.returncode == 0, explain(result)
    older, newest = list_checkpoints(tmp_path / "checkpoints")
    assert newest.name == checkpoint_name(0, 40)
    damage(newest, -1)
    named = run_single([f"logging.dir={tmp_path / 'named'}", *SMALL, f"checkpoint.resume={newest}"])
    assert named.returncode != 0, explain(named)
    errors = [line for line in named.stderr.splitlines() if line.startswith("kfac-dist train: error")]
    assert len(errors) == 1, explain(named)
    expected = rf"kfac-dist train: error \(rank 0\): damaged checkpoint {newest}: record \S+ fails its CRC-32 check"
    assert re.fullmatch(expected, errors[0]), explain(named)
    resumed = run_single([f"logging.dir={tmp_path}", *SMALL, "training.max_steps=60", "checkpoint.resume=auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert f"checkpoint.resume=auto: skipping damaged checkpoint {newest}: record" in resumed.stdout, explain(resumed)
    assert f"resumed from {older} at epoch 0, step 20" in resumed.stdout, explain(resumed)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == checkpoint_name(0, 60)
