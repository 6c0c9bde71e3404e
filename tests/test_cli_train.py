"""The ``kfac-dist train`` command: the default job runs, prints its metrics, and rejects bad options."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser, main, settings_from_args
from launch.train import TrainSettings

FINAL = re.compile(r"^final test accuracy: (\d\.\d{4})$", re.MULTILINE)


def run_main(capsys, *args):
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    match = FINAL.search(out)
    assert match, out
    assert out.rstrip().splitlines()[-1] == match.group(0)
    return out, float(match.group(1))


def test_sgd_one_epoch_learns(capsys):
    out, accuracy = run_main(capsys, "--optimizer", "sgd", "--epochs", "1")
    assert re.search(r"^epoch 1: train loss \d+\.\d{4}, test accuracy \d\.\d{4}", out, re.MULTILINE)
    assert accuracy > 0.85


def test_kfac_one_epoch_learns(capsys):
    _, accuracy = run_main(capsys, "--optimizer", "kfac", "--epochs", "1")
    assert accuracy > 0.85


def test_same_seed_same_result(capsys):
    _, first = run_main(capsys, "--optimizer", "sgd", "--epochs", "1", "--batch-size", "256", "--seed", "3")
    _, second = run_main(capsys, "--optimizer", "sgd", "--epochs", "1", "--batch-size", "256", "--seed", "3")
    assert first == second


def test_defaults_match_train_settings():
    args = build_parser().parse_args(["train"])
    assert settings_from_args(args) == TrainSettings()
    assert settings_from_args(build_parser().parse_args(["train", "--no-kl-clip"])).kl_clip is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--batch-size", "x"], "--batch-size"),
        (["train", "--damping", "0"], "--damping"),
        (["train", "--optimizer", "adam"], "--optimizer"),
        ([], "COMMAND"),
    ],
)
def test_bad_options_exit_2_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"), [("epochs", 0), ("lr", 0.0), ("optimizer", "adam"), ("kl_clip", -1.0)]
)
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{field: value})


def test_console_script_help():
    script = Path(sys.executable).with_name("kfac-dist")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    result = subprocess.run([*command, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--optimizer {kfac,sgd}" in result.stdout
