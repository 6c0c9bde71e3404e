"""The non-finite policy (training.nonfinite): detection, stop, skip, and no non-finite checkpoint ever written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from app_runs import explain, run_single, run_slurm_shaped
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, save_checkpoint
from kfac_dist.app.config import load_config
from kfac_dist.app.env import RunEnv
from kfac_dist.app.nonfinite import NonFiniteError
from kfac_dist.app.trainer import Trainer

SMALL = ["logging.tensorboard=false", "training.log_every_steps=10"]
STOPPED = re.compile(r"training\.nonfinite=stop: the loss or the gradients were not finite in step\(s\) (\d+)-(\d+);")


def _finite(tensors: Iterator[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_diverging_run_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    first = run_single([f"logging.dir={tmp_path}", *SMALL, "training.max_steps=20", "checkpoint.keep=1"])
    assert first.returncode == 0, explain(first)
    (good,) = list_checkpoints(tmp_path / "checkpoints")
    assert good.name == checkpoint_name(0, 20)
    before = good.read_bytes()
    # lr=1e6 from step 21 on: weight decay alone multiplies the weights by -499 per step, so they overflow
    args = [f"logging.dir={tmp_path}", *SMALL, "optimizer.lr=1e6", "checkpoint.resume=auto", "checkpoint.keep=1"]
    diverged = run_single([*args, "training.max_steps=100"])
    assert diverged.returncode == 1, explain(diverged)
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("kfac-dist train: error")]
    assert len(errors) == 1, explain(diverged)
    found = STOPPED.search(errors[0])
    assert found is not None and int(found.group(1)) == 21 and int(found.group(2)) % 10 == 0, errors[0]
    assert f"the last one, {good}, is kept" in errors[0]
    assert "Traceback" not in diverged.stderr, explain(diverged)
    assert list_checkpoints(tmp_path / "checkpoints") == [good]  # nothing written, nothing pruned
    assert good.read_bytes() == before
    assert _finite(iter(load_checkpoint(good)["state"]["model"].values()))


def test_every_rank_stops_with_the_same_step_range(tmp_path: Path) -> None:
    results = run_slurm_shaped([f"logging.dir={tmp_path}", *SMALL, "optimizer.lr=1e6", "training.max_steps=60"])
    ranges = set()
    for rank, result in enumerate(results):
        assert result.returncode == 1, f"rank {rank}: {explain(result)}"
        lines = [
            line for line in result.stderr.splitlines() if line.startswith(f"kfac-dist train: error (rank {rank})")
        ]
        assert len(lines) == 1, f"rank {rank}: {explain(result)}"
        found = STOPPED.search(lines[0])
        assert found is not None, lines[0]
        ranges.add(found.groups())
        assert "stopped before any checkpoint was written" in lines[0]
    assert len(ranges) == 1, ranges
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_every_rank_skips_alike_and_stops_after_too_many(tmp_path: Path) -> None:
    args = [f"logging.dir={tmp_path}", *SMALL, "optimizer.lr=1e6", "training.max_steps=60"]
    results = run_slurm_shaped([*args, "training.nonfinite=skip", "training.nonfinite_max_skips=3"])
    messages = set()
    for rank, result in enumerate(results):
        assert result.returncode == 1, f"rank {rank}: {explain(result)}"
        prefix = f"kfac-dist train: error (rank {rank}): "
        lines = [line[len(prefix) :] for line in result.stderr.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1 and "training.nonfinite=skip:" in lines[0], f"rank {rank}: {explain(result)}"
        assert "in 4 steps in a row" in lines[0] and "training.nonfinite_max_skips=3" in lines[0], lines[0]
        messages.add(lines[0])
    assert len(messages) == 1, messages  # the same steps on every rank
    assert results[0].stdout.count("update skipped") == 3, explain(results[0])
    assert "update skipped" not in results[1].stdout  # announced by rank 0 only
    assert list_checkpoints(tmp_path / "checkpoints") == []


def _poisoned_trainer(tmp_path: Path, poisoned: set[int], *overrides: str) -> Trainer:
    """A one-process MNIST trainer whose inputs at the given (1-based) global steps are NaN."""
    cfg = load_config(None, [f"logging.dir={tmp_path}", *SMALL, *overrides])
    trainer = Trainer(cfg, RunEnv("single", 0, 1, 0, 1, "127.0.0.1", 29500))
    real = trainer._micro_batches

    def batches() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        for group in real():  # pulled right before its step is taken
            step = trainer.position.global_step + 1
            yield [(torch.full_like(x, float("nan")), y) for x, y in group] if step in poisoned else group

    trainer._micro_batches = batches  # type: ignore[method-assign]
    return trainer


def test_skip_drops_the_nonfinite_step_and_trains_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _poisoned_trainer(tmp_path, {5}, "training.nonfinite=skip", "training.max_steps=12")
    result = trainer.run()
    out = capsys.readouterr().out
    assert out.count("update skipped") == 1, out
    assert "step 5: non-finite loss or gradients, update skipped (1 in a row, training.nonfinite_max_skips=10)" in out
    assert result.steps == 12 and torch.isfinite(torch.tensor(result.train_loss)), result
    assert _finite(trainer.model.parameters())
    (path,) = list_checkpoints(tmp_path / "checkpoints")
    assert _finite(iter(load_checkpoint(path)["state"]["model"].values()))


def test_skip_stops_after_too_many_in_a_row(tmp_path: Path) -> None:
    trainer = _poisoned_trainer(
        tmp_path, set(range(4, 100)), "training.nonfinite=skip", "training.nonfinite_max_skips=2"
    )
    with pytest.raises(NonFiniteError, match=r"not finite in 3 steps in a row \(4-6\), more than .*max_skips=2"):
        trainer.run()
    assert trainer.position.global_step == 5  # step 6 raised before it was counted
    assert _finite(trainer.model.parameters())  # no skipped update reached the weights


def test_stop_names_the_interval_and_writes_nothing(tmp_path: Path) -> None:
    trainer = _poisoned_trainer(tmp_path, {15}, "training.max_steps=40", "checkpoint.every_epochs=1")
    with pytest.raises(NonFiniteError, match=r"in step\(s\) 11-20; stopped before any checkpoint was written"):
        trainer.run()
    assert list_checkpoints(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("kl_clip", [None, 1e-3])  # counted from written gradients, or from KL-clip's reduction
def test_kfac_counts_nonfinite_preconditioned_gradients(kl_clip: float | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pre = KFACPreconditioner(model, kl_clip=kl_clip)
    x = torch.randn(8, 4)
    for poison in (False, True, False):
        model.zero_grad()
        model(x).square().mean().backward()
        if poison:
            model[2].weight.grad[0, 0] = float("inf")
        pre.step()
    assert pre.health()["nonfinite_gradient"] == 1
    assert pre.state_dict()["health"]["nonfinite_gradient"] == 1


def test_save_refuses_a_nonfinite_state_and_keeps_the_others(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, {"w": torch.ones(3)}, epoch=1, step=10, keep=1)
    with pytest.raises(ValueError, match=r"state\['model'\]\['w'\] is not finite"):
        save_checkpoint(tmp_path, {"model": {"w": torch.tensor([1.0, float("nan")])}}, epoch=2, step=20, keep=1)
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
