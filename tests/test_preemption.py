"""SIGTERM / SIGUSR1: every rank checkpoints after the same step, exits with 75, and a rerun continues exactly.

The signal is sent once rank 0 has logged its first steps; the step it lands on is not fixed (the machine may be
busy), so the tests compare the resumed run's final parameters with an uninterrupted run's, whatever that step was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from app_runs import explain, run_slurm_shaped, run_torchrun, start_slurm_shaped, start_torchrun
from multiproc import run_multiproc

from kfac_dist.app.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from kfac_dist.app.cli import main
from kfac_dist.app.preemption import EXIT_PREEMPTED, StopSignals
from kfac_dist.comm.torch_dist import TorchDistCommunicator

#: 2 epochs of MNIST-5k on 2 ranks (62 steps each); a log line, and so a stop check, every 5 steps.
COMMON = ["training.epochs=2", "training.log_every_steps=5", "logging.tensorboard=false"]
TOTAL_STEPS = 124
TIMEOUT_S = 300


def _agree(rank: int, world_size: int) -> tuple[str | None, str | None, str | None]:
    comm, device = TorchDistCommunicator(), torch.device("cpu")
    with StopSignals() as stop:
        before = stop.agreed(comm, device)
        os.kill(os.getpid(), (signal.SIGTERM, signal.SIGUSR1)[rank])  # the handler runs before kill returns
        received = stop.received
        after = stop.agreed(comm, device)
    return before, received, after


def test_a_signal_on_any_rank_stops_every_rank() -> None:
    results = run_multiproc(_agree, 2)
    both = "SIGTERM on 1 of 2 ranks, SIGUSR1 on 1 of 2 ranks"
    assert results == [(None, "SIGTERM", both), (None, "SIGUSR1", both)]


def _wait_for(path: Path, text: str, processes: list[subprocess.Popen[str]]) -> None:
    """Until `text` appears in `path`; fails when a process ends first or after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while text not in path.read_text():
        ended = [process.args for process in processes if process.poll() is not None]
        assert not ended and time.monotonic() < deadline, f"no {text!r} in {path}; ended: {ended}\n{path.read_text()}"
        time.sleep(0.2)


def _wait_all(processes: list[subprocess.Popen[str]]) -> list[int]:
    try:
        return [process.wait(timeout=TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    payload = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert (payload["epoch"], payload["step"]) == (2, TOTAL_STEPS)
    return payload["state"]["model"]


def _stopped_step(run_dir: Path) -> int:
    """The step of the one checkpoint a stopped run wrote (before its end: the signal came after step 5)."""
    (path,) = list_checkpoints(run_dir / "checkpoints")
    step = load_checkpoint(path)["step"]
    assert 5 <= step < TOTAL_STEPS, path
    return int(step)


def _resume_and_compare(
    run_dir: Path, reference: dict[str, torch.Tensor], launcher: str, step: int, extra: Sequence[str] = ()
) -> None:
    args = [f"logging.dir={run_dir}", *COMMON, *extra, "checkpoint.resume=auto"]
    if launcher == "torchrun":
        result = run_torchrun(args, timeout=TIMEOUT_S)
        assert result.returncode == 0, explain(result)
        output = result.stdout
    else:
        results = run_slurm_shaped(args, timeout=TIMEOUT_S)
        assert [r.returncode for r in results] == [0, 0], "\n".join(map(explain, results))
        output = results[0].stdout
    assert f"resumed from {run_dir / 'checkpoints'}" in output and f", step {step}\n" in output, output[-3000:]
    resumed = _final_weights(run_dir)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final parameters of the uninterrupted 2-rank run."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    results = run_slurm_shaped([f"logging.dir={run_dir}", *COMMON], timeout=TIMEOUT_S)
    assert [r.returncode for r in results] == [0, 0], "\n".join(map(explain, results))
    return _final_weights(run_dir)


@pytest.mark.parametrize(
    ("name", "targets", "extra"),
    [
        ("SIGTERM", "rank 1", []),  # the signal reaches one rank only
        ("SIGUSR1", "every process", ["data.workers=1"]),  # as Slurm signals a step: data-loader workers too
        # Slurm's time limit, preemption or scancel: the workers ignore it (each has delivered a batch by step 5, so
        # each has run its worker_init_fn) and their rank checkpoints and exits 75.
        ("SIGTERM", "every process", ["data.workers=2"]),
    ],
)
def test_a_stop_signal_checkpoints_every_rank_and_the_rerun_continues_exactly(
    tmp_path: Path, reference: dict[str, torch.Tensor], name: str, targets: str, extra: list[str]
) -> None:
    """srun-shaped ranks (one process each, as ``srun`` starts them)."""
    run_dir = tmp_path / "run"
    processes = start_slurm_shaped([f"logging.dir={run_dir}", *COMMON, *extra], log_dir=tmp_path)
    _wait_for(tmp_path / "rank0.out", " step 5/", processes)
    ranks = [processes[1].pid] if targets == "rank 1" else [process.pid for process in processes]
    for pid in [*ranks, *[child for rank in ranks for child in _children(rank)]]:
        os.kill(pid, getattr(signal, name))
    codes = _wait_all(processes)
    logs = {name: (tmp_path / name).read_text()[-2000:] for name in ("rank0.out", "rank0.err", "rank1.err")}
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    step = _stopped_step(run_dir)
    count = len(ranks)
    assert f"stopped by {name} on {count} of 2 ranks after step {step}, checkpoint written" in logs["rank0.err"], logs
    assert "final test accuracy" not in logs["rank0.out"], logs
    _resume_and_compare(run_dir, reference, "slurm", step, extra)


@pytest.mark.parametrize(("targets", "extra"), [("agent", []), ("every process", ["data.workers=2"])])
def test_sigterm_to_torchrun_stops_its_workers_with_a_checkpoint(
    tmp_path: Path, reference: dict[str, torch.Tensor], targets: str, extra: list[str]
) -> None:
    """torchrun forwards SIGTERM to its workers ("agent"); Slurm signals every process of a step ("every process"),
    data-loader workers too, which then get a second SIGTERM from torchrun (sent to each rank's process group).

    torchrun itself exits with 1 (an uncaught SignalException) whatever its workers returned: the sbatch templates
    decide on requeueing from the signal the batch shell got, not from this code.
    """
    run_dir = tmp_path / "run"
    agent = start_torchrun([f"logging.dir={run_dir}", *COMMON, *extra], tmp_path)
    try:
        _wait_for(tmp_path / "torchrun.out", " step 5/", [agent])
        ranks = _children(agent.pid)
        assert len(ranks) == 2, ranks
        loaders = [child for rank in ranks for child in _children(rank)]
        for pid in [agent.pid, *ranks, *loaders] if targets == "every process" else [agent.pid]:
            os.kill(pid, signal.SIGTERM)
        code = agent.wait(timeout=TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
    err = (tmp_path / "torchrun.err").read_text()
    assert code == 1, err[-3000:]
    step = _stopped_step(run_dir)
    assert f"stopped by SIGTERM on 2 of 2 ranks after step {step}, checkpoint written" in err, err[-3000:]
    assert "Unable to shutdown process" not in err, err[-3000:]  # the workers ended before torchrun's SIGKILL
    _resume_and_compare(run_dir, reference, "torchrun", step, extra)


def test_every_steps_adds_mid_epoch_checkpoints(tmp_path: Path) -> None:
    args = ["train", f"logging.dir={tmp_path}", "training.epochs=1", "logging.tensorboard=false"]
    assert main([*args, "checkpoint.every_steps=50", "checkpoint.keep=10"]) == 0  # 125 steps on one rank
    names = [path.name for path in list_checkpoints(tmp_path / "checkpoints")]
    assert names == [checkpoint_name(0, 50), checkpoint_name(0, 100), checkpoint_name(1, 125)]
