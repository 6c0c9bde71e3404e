"""The ``kfac-dist train`` command line: defaults, --print-config, same seed same result, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_dist.app.checkpoint import load_checkpoint
from kfac_dist.app.cli import main
from kfac_dist.app.config import load_config
from kfac_dist.app.models import build_model


def test_print_config_shows_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: mnist-5k" in printed and "name: small_cnn" in printed
    assert load_config(None) == load_config("configs/mnist_cnn.yaml")


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    weights = []
    for run in ("a", "b"):
        assert main(["train", f"logging.dir={tmp_path / run}", "training.max_steps=30"]) == 0
        (checkpoint,) = (tmp_path / run / "checkpoints").glob("ckpt-*.pt")
        weights.append(load_checkpoint(checkpoint)["state"]["model"])
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    torch.manual_seed(0)  # the run's seed: its initial weights
    assert not torch.equal(weights[0]["fc.weight"], build_model("small_cnn").fc.weight.detach())  # it trained


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "training.epochs=0"], "training.epochs"),
        (["train", "optimizer.name=lbfgs"], "optimizer.name"),
        (["train", "--config", "does/not/exist.yaml"], "does/not/exist.yaml"),
    ],
)
def test_bad_input_exits_2_naming_the_key(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_console_script_and_module_entry_points() -> None:
    console = Path(sys.executable).parent / "kfac-dist"
    for command in ([str(console), "train", "--help"], [sys.executable, "-m", "kfac_dist.app.train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "--config" in result.stdout


@pytest.mark.parametrize("prog", ["cli", "module"])
def test_overrides_may_follow_flags(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kfac_dist.app import train

    words = ["model.name=mlp", "--config", "configs/mnist_cnn.yaml", "training.epochs=3", "--print-config"]
    words += ["training.epochs=7"]  # the later override of the same key wins
    assert (main(["train", *words]) if prog == "cli" else train.main(words)) == 0
    printed = capsys.readouterr().out
    assert "name: mlp" in printed and "epochs: 7" in printed


def test_unknown_flags_are_still_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--print-config", "--no-such-flag", "training.epochs=2"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "resnet50", "--no-such-flag", "--world-size", "4"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["plan", "--model", "resnet50", "--world-size", "4", "a=b"]) == 2  # overrides need --config
    assert "overrides need --config" in capsys.readouterr().err
