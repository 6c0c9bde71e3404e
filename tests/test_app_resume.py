"""Checkpoint and resume through the application: exact continuation, and resuming on other world sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from app_runs import explain, run_single, run_torchrun

from kfac_dist.app.checkpoint import latest_checkpoint, load_checkpoint
from kfac_dist.app.cli import main

COMMON = ["training.epochs=2", "logging.tensorboard=false"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    payload = load_checkpoint(path)
    assert payload["epoch"] == 2
    return payload["state"]["model"]


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path: Path) -> None:
    assert main(["train", f"logging.dir={tmp_path / 'whole'}", *COMMON]) == 0
    # interrupted mid-epoch 2 (125 steps per epoch on one rank), then resumed from its checkpoint
    assert main(["train", f"logging.dir={tmp_path / 'split'}", *COMMON, "training.max_steps=170"]) == 0
    assert main(["train", f"logging.dir={tmp_path / 'split'}", *COMMON, "checkpoint.resume=auto"]) == 0
    whole, split = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    for name, tensor in whole.items():
        assert torch.equal(split[name], tensor), name


def test_two_rank_checkpoint_resumes_on_one_and_on_three_ranks(tmp_path: Path) -> None:
    first = run_torchrun([f"logging.dir={tmp_path / 'two'}", *COMMON, "training.max_steps=40"])
    assert first.returncode == 0, explain(first)
    (checkpoint,) = (tmp_path / "two" / "checkpoints").glob("ckpt-*.pt")
    for ranks in (1, 3):
        args = [f"logging.dir={tmp_path / str(ranks)}", *COMMON, f"checkpoint.resume={checkpoint}"]
        result = run_single(args) if ranks == 1 else run_torchrun(args, nproc=3)
        assert result.returncode == 0, explain(result)
        assert f"resumed from {checkpoint} at epoch 0, step 40" in result.stdout, explain(result)
        assert final_weights(tmp_path / str(ranks)).keys() == load_checkpoint(checkpoint)["state"]["model"].keys()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    assert main(["train", f"logging.dir={tmp_path / 'cnn'}", *COMMON, "training.max_steps=5"]) == 0
    (checkpoint,) = (tmp_path / "cnn" / "checkpoints").glob("ckpt-*.pt")
    result = run_single([f"logging.dir={tmp_path / 'mlp'}", "model.name=mlp", f"checkpoint.resume={checkpoint}"])
    assert result.returncode != 0
    assert "model" in result.stderr and "small_cnn" in result.stderr and "mlp" in result.stderr, explain(result)
