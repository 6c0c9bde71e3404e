"""What the application tells the user: the start-up block, the periodic log line, fallbacks, the max_steps finish."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from app_runs import explain, final_accuracy, run_single_on_terminal, run_torchrun

from kfac_dist.app.cli import main
from kfac_dist.app.config import load_config
from kfac_dist.app.env import RunEnv
from kfac_dist.app.metrics import read_metrics
from kfac_dist.app.trainer import Trainer
from kfac_dist.report import HEALTH_COUNTERS

LOG_LINE = re.compile(
    r"^epoch 1/5 step (\d+)/(\d+): loss (\S+), lr (\S+), ([\d.]+) ms/step \((K-FAC \d+%|no K-FAC)\), "
    r"ETA \d+:\d\d:\d\d$",
    re.MULTILINE,
)
FALLBACK = re.compile(r"^rank (\d+): K-FAC numerical fallback by step (\d+): (\w+) \+(\d+) \((\d+) in total\)$", re.M)


def test_two_rank_run_stopped_by_max_steps_reports_and_validates(tmp_path: Path) -> None:
    args = [f"logging.dir={tmp_path}", "training.max_steps=5", "training.log_every_steps=2"]
    args += ["kfac.skip_layers=[fc]", "logging.progress_bar=true"]  # no terminal here: plain lines all the same
    result = run_torchrun(args)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert out.count("kfac-dist train: small_cnn on mnist-5k") == 1, explain(result)  # rank 0 only, once
    assert "world size 2, backend gloo, device cpu, precision fp32 (training.amp=none)" in out
    assert re.search(r"K-FAC memory per rank \(planned\): max [\d.]+ MiB", out), out
    assert re.search(r"K-FAC traffic per rank per step .*: max [\d.]+ MiB", out), out
    assert "layers: 2 preconditioned, 1 skipped" in out and "skipped fc (pattern 'fc')" in out, out
    lines = LOG_LINE.findall(out)
    assert [(int(step), int(total)) for step, total, *_ in lines] == [(2, 5), (4, 5)], out
    assert all(math.isfinite(float(loss)) and float(lr) > 0 for _, _, loss, lr, *_ in lines), out
    assert "\r" not in out and "\r" not in result.stderr
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "5")]
    assert math.isfinite(float(rows[0]["train_loss"])) and int(rows[0]["bytes_sent"]) > 0
    accuracy = final_accuracy(out)
    assert 0.0 < accuracy <= 1.0 and f"{float(rows[0]['val_top1']):.4f}" == f"{accuracy:.4f}", explain(result)
    assert "(stopped at training.max_steps=5)" in out
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*-step00000005.pt"))) == 1


def test_planned_memory_is_what_the_preconditioner_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, [f"logging.dir={tmp_path}", "training.max_steps=3"])
    trainer = Trainer(cfg, RunEnv("single", 0, 1, 0, 1, "127.0.0.1", 29500))
    trainer.run()
    out = capsys.readouterr().out
    planned = re.search(r"K-FAC memory per rank \(planned\): max ([\d.,]+) MiB", out)
    assert planned is not None, out
    assert trainer.pre is not None
    held = sum(trainer.pre.memory_usage().values())
    assert held > 0 and planned.group(1) == f"{held / 2**20:,.2f}", out
    assert "backend local" in out and "preconditioned: conv1, conv2, fc" in out


def test_numerical_fallbacks_are_logged_at_logging_intervals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diverging = ["optimizer.lr=1e6", "optimizer.lr_scaling=none", "kfac.kl_clip=null"]
    args = [f"logging.dir={tmp_path}", "training.max_steps=6", "training.log_every_steps=2", *diverging]
    assert main(["train", *args]) == 1  # the loss turns non-finite: training.nonfinite=stop ends the run
    captured = capsys.readouterr()
    assert "training.nonfinite=stop: the loss or the gradients were not finite" in captured.err
    fallbacks = FALLBACK.findall(captured.out)
    assert fallbacks, captured.out
    totals: dict[str, int] = {}
    for rank, step, counter, grown, total in fallbacks:
        assert rank == "0" and int(step) % 2 == 0, captured.out  # checked at logging intervals only
        assert counter in HEALTH_COUNTERS
        assert int(total) == totals.get(counter, 0) + int(grown)
        totals[counter] = int(total)
    assert totals.get("nonfinite_gradient", 0) > 0, captured.out  # kl_clip=null: no KL-clip to spread a NaN
    metrics = tmp_path / "metrics.csv"
    assert not metrics.exists() or read_metrics(metrics) == []  # stopped before the epoch's row


def test_progress_bar_is_drawn_only_on_a_terminal(tmp_path: Path) -> None:
    args = [f"logging.dir={tmp_path}", "training.max_steps=4", "training.log_every_steps=2"]
    args.append("logging.progress_bar=true")
    code, out, terminal = run_single_on_terminal(args)
    assert code == 0, terminal
    assert "\r[" in terminal and "step 4/4" in terminal, terminal
    assert not LOG_LINE.search(out) and "final test accuracy" in out, out  # the bar replaces the lines
