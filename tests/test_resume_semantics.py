"""Resume semantics: the checkpoint gives the state, the config the hyperparameters; the model, data set and optimizer
type may not change; metrics.csv never repeats an epoch on resume or rerun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfac_dist.app.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from kfac_dist.app.cli import main
from kfac_dist.app.config import load_config
from kfac_dist.app.env import detect_env
from kfac_dist.app.metrics import read_metrics
from kfac_dist.app.trainer import Trainer

FAST = ["logging.tensorboard=false", "data.batch_size=128"]  # 31 steps per epoch on one process


def short_run(run_dir: Path, *extra: str) -> Path:
    """Train 3 steps into ``run_dir`` and return its checkpoint."""
    assert main(["train", f"logging.dir={run_dir}", *FAST, "training.max_steps=3", *extra]) == 0
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None
    return checkpoint


def test_resume_applies_the_configs_hyperparameters_over_the_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = short_run(tmp_path)
    saved = load_checkpoint(checkpoint)["state"]
    assert saved["optimizer"]["param_groups"][0]["momentum"] == 0.9
    changed = ["optimizer.momentum=0.5", "optimizer.weight_decay=0.001", "kfac.damping=0.1", "kfac.kl_clip=0.01"]
    cfg = load_config(None, [f"logging.dir={tmp_path}", *FAST, "checkpoint.resume=auto", *changed])
    trainer = Trainer(cfg, detect_env())
    assert trainer.maybe_resume() == checkpoint
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 0.001)  # the config's, not the checkpoint's
    assert trainer.resume_changes == ["momentum 0.9 -> 0.5", "weight_decay 0.0005 -> 0.001"]
    # ... while the state is the checkpoint's: momentum buffers, K-FAC's step counter, the position
    first = next(trainer.model.parameters())
    assert torch.equal(
        trainer.optimizer.state[first]["momentum_buffer"], saved["optimizer"]["state"][0]["momentum_buffer"]
    )
    assert trainer.pre is not None and trainer.pre.steps == 3 and trainer.position.global_step == 3
    assert (trainer.pre.options.damping, trainer.pre.options.kl_clip) == (0.1, 0.01)
    capsys.readouterr()
    # through the command line: the run says what the config changed, and goes on
    resumed = ["train", f"logging.dir={tmp_path}", *FAST, "checkpoint.resume=auto", "training.max_steps=5", *changed]
    assert main(resumed) == 0
    out = capsys.readouterr().out
    assert "the config's optimizer values replace the checkpoint's: momentum 0.9 -> 0.5, weight_decay" in out, out


@pytest.mark.parametrize(
    ("override", "written"),
    [
        ("optimizer.name=adam", "optimizer.name='sgd', this config says 'adam'"),
        ("optimizer.name=adamw", "optimizer.name='sgd', this config says 'adamw'"),
        ("model.name=mlp", "model.name='small_cnn', this config says 'mlp'"),
    ],
)
def test_resume_with_another_optimizer_type_or_model_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, written: str
) -> None:
    checkpoint = short_run(tmp_path)
    capsys.readouterr()
    assert main(["train", f"logging.dir={tmp_path}", *FAST, "checkpoint.resume=auto", override]) == 2
    err = capsys.readouterr().err
    expected = f"kfac-dist train: error (rank 0): checkpoint.resume: the checkpoint {checkpoint} was written with "
    assert err.startswith(expected + written + "; allowed: "), err
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyError" not in err


def test_checkpoint_without_the_identity_keys_is_checked_by_its_optimizer_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = short_run(tmp_path)
    payload = load_checkpoint(checkpoint)
    old_meta = {"model": "small_cnn", "config_fingerprint": payload["meta"]["config_fingerprint"]}  # as before
    checkpoint.unlink()
    save_checkpoint(checkpoint.parent, payload["state"], epoch=0, step=3, keep=2, meta=old_meta)
    capsys.readouterr()
    assert main(["train", f"logging.dir={tmp_path}", *FAST, "checkpoint.resume=auto", "optimizer.name=adam"]) == 2
    assert "was written with optimizer.name='sgd', this config says 'adam'" in capsys.readouterr().err
    assert main(["train", f"logging.dir={tmp_path}", *FAST, "checkpoint.resume=auto", "training.max_steps=4"]) == 0


def epochs_and_steps(run_dir: Path) -> list[tuple[int, int]]:
    return [(int(row["epoch"]), int(row["step"])) for row in read_metrics(run_dir / "metrics.csv")]


def test_resume_from_an_older_checkpoint_or_a_rerun_keeps_one_metrics_row_per_epoch(tmp_path: Path) -> None:
    args = ["train", f"logging.dir={tmp_path}", *FAST, "training.epochs=3", "checkpoint.keep=3"]
    assert main(args) == 0
    assert epochs_and_steps(tmp_path) == [(1, 31), (2, 62), (3, 93)]
    first = list_checkpoints(tmp_path / "checkpoints")[0]
    assert load_checkpoint(first)["epoch"] == 1
    assert main([*args, f"checkpoint.resume={first}"]) == 0  # epochs 2 and 3 again
    assert epochs_and_steps(tmp_path) == [(1, 31), (2, 62), (3, 93)]
    assert main([*args, "training.epochs=1"]) == 0  # a rerun from scratch in the same directory
    assert epochs_and_steps(tmp_path) == [(1, 31)]
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temporary file left
