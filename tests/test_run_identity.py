"""Every rank of a process group belongs to the same run: ranks of two launches that meet at one address fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app_runs import REPO, free_port

from kfac_dist.app.env import run_identity

STEP_0 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}


def test_run_identity_names_job_step_launch_and_config() -> None:
    same_step_other_rank = run_identity("a: 1\n", {**STEP_0, "SLURM_PROCID": "1"})
    assert run_identity("a: 1\n", STEP_0) == same_step_other_rank
    assert run_identity("a: 1\n", STEP_0).startswith("slurm job 4242 step 0, config ")
    assert run_identity("a: 1\n", {**STEP_0, "SLURM_STEP_ID": "1"}) != same_step_other_rank  # srun & srun &
    assert run_identity("a: 2\n", STEP_0) != same_step_other_rank  # another config
    torchrun = run_identity("a: 1\n", {"TORCHELASTIC_RUN_ID": "abc"})
    assert torchrun.startswith("torchrun run abc, config ") and torchrun != run_identity("a: 1\n", {})
    assert run_identity("a: 1\n", {"SLURM_JOB_ID": "7"}).startswith("slurm job 7 step batch, ")


def _launcher_free_env(**extra: str) -> dict[str, str]:
    skip = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip) and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", **extra)
    return env


def test_ranks_of_two_job_steps_at_one_port_fail_on_every_rank_naming_the_steps(tmp_path: Path) -> None:
    """Two ``srun`` steps of one job that meet at one port (as they did when the port came from the job id only)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _launcher_free_env(
            SLURM_JOB_ID="4242", SLURM_STEP_ID=str(rank), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE="2",
            SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        command = [sys.executable, "-m", "kfac_dist.app.train", f"logging.dir={tmp_path}", "comm.backend=gloo"]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outputs.append((proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (code, out, err) in enumerate(outputs):
        context = f"rank {rank}: exit {code}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-3000:]}"
        assert code == 1, context
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, context  # one line, no traceback
        assert lines[0].startswith(f"kfac-dist train: error (rank {rank}): rank 1 belongs to another run"), context
        assert "slurm job 4242 step 0" in lines[0] and "slurm job 4242 step 1" in lines[0], context
    assert not (tmp_path / "metrics.csv").exists()  # nobody trained
