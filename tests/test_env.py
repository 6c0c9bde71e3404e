"""Run-environment detection (kfac_dist/app/env.py): launcher environments, hostlists, bad values, and real launches.

The launcher dictionaries marked "captured" were printed by the real launcher on this project's machines
(torchrun 2.13, MPICH 5.0.2 Hydra ``mpiexec``, Slurm 22.05 ``sbatch`` + ``srun``), trimmed to what matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from kfac_dist.app.env import (
    LaunchEnvError,
    RunEnv,
    cuda_device_index,
    detect_env,
    expand_hostlist,
    init_distributed,
    slurm_port,
)

ROOT = Path(__file__).resolve().parents[1]

# torchrun --standalone --nproc_per_node=2, rank 1 (captured)
TORCHRUN = {"RANK": "1", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1",
            "MASTER_ADDR": "localhost", "MASTER_PORT": "43129", "LOCAL_RANK": "1"}  # fmt: skip
# the shell of `sbatch -n 4 batch.sh` (captured): SLURM_PROCID=0 and SLURM_NTASKS=4, but one process
SBATCH_SHELL = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
                "SLURM_NODEID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "4"}  # fmt: skip
# `srun -n2` inside that job, task 1 (captured)
SRUN_TASK = {**SBATCH_SHELL, "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
             "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2"}  # fmt: skip
# MPICH Hydra `mpiexec -n 2`, rank 1 (captured)
HYDRA = {"MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "9", "PMI_HOSTNAME": "vm", "PMI_RANK": "1",
         "PMI_SIZE": "2"}  # fmt: skip
# Open MPI `mpirun -n 8` over two hosts, rank 5 (the documented OMPI_COMM_WORLD_* variables)
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1"}  # fmt: skip


def test_torchrun() -> None:
    assert detect_env(TORCHRUN) == RunEnv("torchrun", 1, 2, 1, 2, "localhost", 43129)


def test_torchrun_multi_node_and_env_without_local_vars() -> None:
    multi = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n01"}
    assert detect_env(multi) == RunEnv("torchrun", 5, 8, 1, 4, "n01", 29500)
    assert detect_env({"RANK": "1", "WORLD_SIZE": "2"}) == RunEnv("torchrun", 1, 2, 1, 2, "127.0.0.1", 29500)
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not set"):
        detect_env({k: v for k, v in multi.items() if k != "MASTER_ADDR"})


def test_torchrun_wins_inside_srun() -> None:
    assert detect_env({**SRUN_TASK, **TORCHRUN}).launcher == "torchrun"


def test_srun_task() -> None:
    # master: the step's first host; port: 15000 + (SLURM_JOB_ID % 200) * 100 + SLURM_STEP_ID % 100
    assert detect_env(SRUN_TASK) == RunEnv("slurm", 1, 2, 1, 2, "localhost", 15100)


def test_srun_multi_node() -> None:
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-a[07-08,10],login1", "SLURM_STEP_ID": "3",
           "SLURM_STEP_NODELIST": "gpu-a[08,10]", "SLURM_PROCID": "5", "SLURM_NTASKS": "12",
           "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4,3"}  # fmt: skip
    assert detect_env(env) == RunEnv("slurm", 5, 7, 1, 3, "gpu-a08", 15000 + 56 * 100 + 3)
    without_step_list = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_env(without_step_list).master_addr == "gpu-a07"
    overridden = detect_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (overridden.master_addr, overridden.master_port) == ("10.0.0.1", 1234)
    uneven = {**env, "SLURM_STEP_TASKS_PER_NODE": "3(x2),1", "SLURM_NODEID": "2", "SLURM_PROCID": "6",
              "SLURM_LOCALID": "0"}  # fmt: skip
    assert detect_env(uneven).local_world_size == 1


def test_sbatch_shell_is_a_single_process() -> None:
    # outside any step: the port of the batch script's step (Slurm's id 0xFFFFFFFB = 4294967291)
    assert detect_env(SBATCH_SHELL) == RunEnv("single", 0, 1, 0, 1, "127.0.0.1", 15000 + 100 + 91)
    # newer Slurm: the batch/interactive/extern steps carry special ids
    for special in ("4294967291", "4294967290", "4294967292", "batch"):
        assert detect_env({**SBATCH_SHELL, "SLURM_STEP_ID": special}).launcher == "single"
    salloc_shell = {k: v for k, v in SBATCH_SHELL.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    assert detect_env(salloc_shell).launcher == "single"


def test_mpich_hydra() -> None:
    assert detect_env(HYDRA) == RunEnv("mpi", 1, 2, 1, 2, "127.0.0.1", 29500)
    assert detect_env({"PMI_RANK": "0", "PMI_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}).local_rank == 0
    with pytest.raises(LaunchEnvError, match="MPI_LOCALRANKID is not set"):
        detect_env({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_open_mpi() -> None:
    assert detect_env({**OPEN_MPI, "MASTER_ADDR": "n01"}) == RunEnv("mpi", 5, 8, 1, 4, "n01", 29500)
    with pytest.raises(LaunchEnvError, match=r"the 8 ranks span several hosts \(4 on this one\) and MASTER_ADDR"):
        detect_env(OPEN_MPI)
    one_host = {**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}
    assert detect_env(one_host).master_addr == "127.0.0.1"


def test_mpi_inside_a_slurm_step() -> None:
    # MPICH `mpiexec -n 2` inside an sbatch script (captured): Hydra starts its proxy with srun, so both ranks see
    # the proxy's one-task step (SLURM_PROCID=0 of 1) besides PMI_RANK 0/1 of 2; without the rule both were rank 0
    proxy_step = {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                  "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"}  # fmt: skip
    assert detect_env({**proxy_step, **HYDRA}) == RunEnv("mpi", 1, 2, 1, 2, "127.0.0.1", 15100)
    # mpirun inside sbatch starts its daemons with srun: the step describes 2 daemons, MPI the 8 ranks
    daemons = {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect_env({**daemons, **OPEN_MPI, "MASTER_ADDR": "n01"}).launcher == "mpi"
    assert detect_env({**daemons, **OPEN_MPI, "MASTER_ADDR": "n01"}).rank == 5
    # srun --mpi=pmi2 starts the ranks itself: PMI agrees with Slurm, and Slurm's richer view is used
    pmi = {**SRUN_TASK, "PMI_RANK": "1", "PMI_SIZE": "2"}
    assert detect_env(pmi).launcher == "slurm"


def test_slurm_port_is_the_same_for_every_rank_of_a_step_and_differs_between_steps_and_jobs() -> None:
    ranks = [{**SRUN_TASK, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(2)]
    steps = [{**task, "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step)} for step in (0, 1) for task in ranks]
    ports = [detect_env(env).master_port for env in steps]
    assert ports[0] == ports[1] and ports[2] == ports[3] and ports[0] != ports[2], ports  # `srun & srun &`
    # every step < 100 of any 200 consecutive jobs: one port each, all in [15000, 35000)
    for first_job in (1, 123_456_789):
        seen = {slurm_port(job, step) for job in range(first_job, first_job + 200) for step in range(100)}
        assert len(seen) == 200 * 100 and min(seen) >= 15000 and max(seen) < 35000


def test_slurm_lib_derives_the_same_port_as_the_application() -> None:
    cases = [(1, 0), (4242, 1), (123456, 3), (999, 4294967291)]
    script = 'source slurm/lib.sh; for case in "$@"; do kfac_step_port ${case%:*} ${case#*:}; done'
    words = [f"{job}:{step}" for job, step in cases]
    shell = subprocess.run(["bash", "-c", script, "-", *words], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert [int(line) for line in shell.stdout.split()] == [slurm_port(job, step) for job, step in cases]
    batch = subprocess.run(
        ["bash", "-c", "source slurm/lib.sh; kfac_step_port"], cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": "1"},
    )  # fmt: skip
    assert int(batch.stdout) == detect_env(SBATCH_SHELL).master_port, batch.stderr  # outside a step: the batch's


def test_single() -> None:
    assert detect_env({}) == RunEnv("single", 0, 1, 0, 1, "127.0.0.1", 29500)
    assert detect_env({"MASTER_PORT": "4000"}).master_port == 4000


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is not < WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 must be >= 0"),
        ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not < LOCAL_WORLD_SIZE=2"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "LOCAL_WORLD_SIZE=3 is larger than WORLD_SIZE=2"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 must be <= 65535"),
        ({**TORCHRUN, "MASTER_PORT": "80a"}, "MASTER_PORT='80a' is not an integer"),
        ({**SRUN_TASK, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not < SLURM_STEP_NUM_TASKS=2"),
        ({**SRUN_TASK, "SLURM_LOCALID": "one"}, "SLURM_LOCALID='one' is not an integer"),
        ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(y3)"}, "SLURM_STEP_TASKS_PER_NODE='2(y3)' is not a Slurm"),
        ({**SRUN_TASK, "SLURM_NODEID": "1"}, "SLURM_NODEID=1 is not < the 1 nodes of SLURM_STEP_TASKS_PER_NODE"),
        ({**SRUN_TASK, "SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST='n[1-' is not a Slurm hostlist"),
        ({**SRUN_TASK, "SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc' is not an integer"),
        ({**HYDRA, "PMI_SIZE": "1"}, "PMI_RANK=1 is not < PMI_SIZE=1"),
        ({**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, "_LOCAL_RANK=4 is not < OMPI_COMM_WORLD_LOCAL_SIZE=4"),
    ],
)  # fmt: skip
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvError, match=re.escape(message)):
        detect_env(environ)


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[01-04,07],gpu-a[1-2]", ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a, b,c[3]", ["a", "b", "c3"]),
        ("10.0.0.[1-2],login", ["10.0.0.1", "10.0.0.2", "login"]),
        ("cn[5]x", ["cn5x"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "a,,b", "n[1-", "n]1[", "n[[1]]", "n[3-1]", "n[a-b]", "n[1-2-3]", "[1-2]"])
def test_bad_hostlist(hostlist: str) -> None:
    with pytest.raises(LaunchEnvError, match="SLURM_JOB_NODELIST="):
        expand_hostlist(hostlist)


def test_cuda_device_index() -> None:
    assert cuda_device_index(3, 4, 4) == 3
    assert cuda_device_index(3, 4, 8) == 3
    assert cuda_device_index(3, 4, 1) == 0  # one GPU bound per task
    with pytest.raises(LaunchEnvError, match="4 processes on this host but 2 visible CUDA devices"):
        cuda_device_index(3, 4, 2)


def test_init_distributed_single_process_and_bad_options() -> None:
    single = detect_env({})
    assert init_distributed(single, "auto", 10.0) == "gloo"
    assert not dist.is_initialized()  # world size 1: no group unless forced
    with pytest.raises(LaunchEnvError, match="backend='tcp' is not one of auto, nccl, gloo, mpi"):
        init_distributed(single, "tcp", 10.0)
    with pytest.raises(LaunchEnvError, match="needs CUDA and NCCL"):
        init_distributed(single, "nccl", 10.0)
    with pytest.raises(LaunchEnvError, match="timeout_s=0"):
        init_distributed(single, "gloo", 0)


# ---- real launches: each rank joins a gloo group, all-reduces, and writes what it saw ----

WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from kfac_dist.app.env import detect_env, init_distributed, shutdown_distributed
env = detect_env()
backend = init_distributed(env, "gloo", timeout_s=60)
total = torch.tensor([float(env.rank + 1)])
dist.all_reduce(total)
ranks = [None] * env.world_size
dist.all_gather_object(ranks, env.rank)
shutdown_distributed()
seen = dict(vars(env), backend=backend, total=total.item(), ranks=ranks)
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
    json.dump(seen, f)
print("worker", env.rank, "of", env.world_size, "done", flush=True)
"""
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_", "TORCHELASTIC_")
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (pytest may itself run under one)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT), **extra)
    return env


def _free_port(low: int = 1024, high: int = 65535) -> int:
    for port in range(low, high):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def _run_all(commands: list[list[str]], envs: list[dict[str, str]], timeout: float = 120.0) -> None:
    """Start every command, wait for all (killing all at `timeout`), and fail naming every bad exit code."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )  # fmt: skip
        for cmd, env in zip(commands, envs, strict=True)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        outputs.append(out.decode(errors="replace"))
    timed_out = time.monotonic() > deadline
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    report = "\n".join(
        f"--- process {i}: exit code {p.returncode} ---\n{outputs[i][-3000:]}" for i, p in enumerate(procs)
    )
    why = f"killed at the {timeout:.0f} s timeout" if timed_out else f"timeout {timeout:.0f} s"
    assert not failed, f"processes {failed} failed ({why}):\n{report}"


def _check_ranks(out: Path, launcher: str, world_size: int, local_world_size: int) -> None:
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result"
        seen = json.loads(path.read_text())
        assert (seen["launcher"], seen["rank"], seen["world_size"]) == (launcher, rank, world_size)
        assert (seen["local_rank"], seen["local_world_size"]) == (rank, local_world_size)
        assert (seen["backend"], seen["total"]) == ("gloo", world_size * (world_size + 1) / 2)
        assert seen["ranks"] == list(range(world_size))


@pytest.mark.timeout(180)
def test_real_mpiexec(tmp_path: Path) -> None:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), f"{mpiexec} is missing: pip install mpich (requirements/test.txt)"
    _run_all([[str(mpiexec), "-n", "2", sys.executable, "-c", WORKER, str(tmp_path)]],
             [_clean_env(MASTER_PORT=str(_free_port()))])  # fmt: skip
    _check_ranks(tmp_path, "mpi", 2, 2)


@pytest.mark.timeout(180)
def test_real_torchrun(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    _run_all([[*torchrun, sys.executable, "-c", WORKER, str(tmp_path)]], [_clean_env()])
    _check_ranks(tmp_path, "torchrun", 2, 2)


@pytest.mark.timeout(180)
def test_real_processes_with_srun_variables(tmp_path: Path) -> None:
    # two plain processes shaped like `srun -n2` tasks; the port comes from SLURM_JOB_ID and SLURM_STEP_ID
    port = _free_port(15000, 35000)
    job, step_id = 200 + (port - 15000) // 100, (port - 15000) % 100
    step = {"SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_ID": str(step_id),
            "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_NTASKS_PER_NODE": "2"}  # fmt: skip
    envs = [_clean_env(**step, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in range(2)]
    assert detect_env(envs[0]).master_port == port
    _run_all([[sys.executable, "-c", WORKER, str(tmp_path)]] * 2, envs)
    _check_ranks(tmp_path, "slurm", 2, 2)


def test_horovodrun_gloo_variables_are_detected() -> None:
    environ = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}
    env = detect_env(environ)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == (
        "horovodrun",
        1,
        2,
        1,
        "127.0.0.1",
    )
    with pytest.raises(LaunchEnvError, match="HOROVOD_RANK=2 is not < HOROVOD_SIZE=2"):
        detect_env({**environ, "HOROVOD_RANK": "2"})
