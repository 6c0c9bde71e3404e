"""Run the training application as users do (a plain process, torchrun, env vars shaped like srun's) and check
every process's exit code; a run that outlives its timeout is killed and fails the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in list(env):  # a test must not inherit a launcher's identity
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[name]
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_single(args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m kfac_dist.app.train ARGS`` as one plain process."""
    command = [sys.executable, "-m", "kfac_dist.app.train", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_single_on_terminal(args: Sequence[str], timeout: float = 300) -> tuple[int, str, str]:
    """``python -m kfac_dist.app.train ARGS`` with stderr on a pseudo-terminal: (exit code, stdout, terminal output)."""
    import pty
    import threading

    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while the run writes, so a full terminal buffer never blocks it
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other end is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    command = [sys.executable, "-m", "kfac_dist.app.train", *args]
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, text=True
    )
    os.close(follower)
    try:
        out, _ = process.communicate(timeout=timeout)
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def run_torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N -m kfac_dist.app.train ARGS`` (torchrun fails if any rank fails)."""
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "kfac_dist.app.train", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_torchrun(args: Sequence[str], log_dir: Path, nproc: int = 2) -> subprocess.Popen[str]:
    """Start `run_torchrun`'s command without waiting; its stdout and stderr go to LOG_DIR/torchrun.{out,err}."""
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "kfac_dist.app.train", *args]
    with open(log_dir / "torchrun.out", "w") as out, open(log_dir / "torchrun.err", "w") as err:
        return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=err, text=True)


def start_slurm_shaped(
    args: Sequence[str], ntasks: int = 2, log_dir: Path | None = None
) -> list[subprocess.Popen[str]]:
    """Start `run_slurm_shaped`'s processes without waiting (rank order); with LOG_DIR, each rank's stdout and stderr
    go to LOG_DIR/rank{R}.{out,err} instead of pipes."""
    port = str(free_port())
    processes = []
    for rank in range(ntasks):
        extra = {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_TASKS_PER_NODE": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": str(ntasks),
            "SLURM_NNODES": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        command = [sys.executable, "-m", "kfac_dist.app.train", *args]
        if log_dir is None:
            pipe = subprocess.PIPE
            processes.append(subprocess.Popen(command, cwd=REPO, env=_env(extra), stdout=pipe, stderr=pipe, text=True))
            continue
        with open(log_dir / f"rank{rank}.out", "w") as out, open(log_dir / f"rank{rank}.err", "w") as err:
            processes.append(subprocess.Popen(command, cwd=REPO, env=_env(extra), stdout=out, stderr=err, text=True))
    return processes


def run_slurm_shaped(
    args: Sequence[str], ntasks: int = 2, timeout: float = 300
) -> list[subprocess.CompletedProcess[str]]:
    """N plain processes with the variables ``srun -N1 -n N`` sets; returns each one's result (rank order)."""
    processes = start_slurm_shaped(args, ntasks)
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


def explain(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code and output tails, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def final_accuracy(output: str) -> float:
    """The value of the ``final test accuracy:`` line."""
    marker = "final test accuracy:"  # horovodrun prefixes each line with "[rank]<stdout>:"
    lines = [line.split(marker, 1)[1] for line in output.splitlines() if marker in line]
    assert len(lines) == 1, output
    return float(lines[0])


def run_mpiexec(args: Sequence[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n N python -m kfac_dist.app.train ARGS`` with pip's MPICH (exits non-zero if any rank fails)."""
    command = [str(BIN / "mpiexec"), "-n", str(nproc), sys.executable, "-m", "kfac_dist.app.train", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_horovodrun(args: Sequence[str], nproc: int = 2, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``horovodrun -np N -H localhost:N --gloo python -m kfac_dist.app.train ARGS``."""
    command = [str(BIN / "horovodrun"), "-np", str(nproc), "-H", f"localhost:{nproc}", "--gloo"]
    command += [sys.executable, "-m", "kfac_dist.app.train", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
