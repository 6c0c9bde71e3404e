"""The Horovod backend (`HorovodCommunicator`) in real processes, at W = 2 and 3, under both of Horovod's
launchers: `horovodrun --gloo` (Gloo controller) and `mpiexec` (MPI controller).

Each run is tests/backend_runs.py: every Communicator operation checked exactly (results and bytes), then K-FAC
for every fraction x method x packing x factor scheme, equal to one process and to the closed-form bytes.
Horovod is built once per machine by scripts/install_horovod.sh (scripts/setup.sh runs it).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from backend_runs import SCRIPT, find_launcher, launch, mpiexec_command
from distributed_cases import cases

INSTALL_HINT = "bash scripts/install_horovod.sh: 4-10 min once per machine, then cached; scripts/setup.sh test runs it"


def _horovod_controllers() -> set[str]:
    """The controllers the installed Horovod was built with (probed in a child: loading it is not free)."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip(f"horovod is not installed ({INSTALL_HINT})")
    probe = "import horovod.torch as h; print(*(c for c in ('gloo', 'mpi') if getattr(h, f'{c}_built')()))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import horovod.torch fails:\n{result.stdout}{result.stderr}"
    return set(result.stdout.split())


@pytest.mark.parametrize("world_size", [2, 3])
def test_horovod_backend_under_horovodrun_gloo(world_size: int) -> None:
    if "gloo" not in _horovod_controllers():
        pytest.skip(f"horovod was built without Gloo ({INSTALL_HINT})")
    horovodrun = find_launcher("horovodrun")
    if horovodrun is None:
        pytest.skip("horovod is installed but horovodrun is not on PATH")
    hosts = f"localhost:{world_size}"
    command = [horovodrun, "-np", str(world_size), "-H", hosts, "--gloo", sys.executable, SCRIPT, "horovod"]
    status, output = launch(command, timeout=270)
    assert status == 0, f"horovodrun exited with {status}:\n{output}"
    assert f"backend_runs: horovod W={world_size}: all {1 + len(cases(world_size))} checks passed" in output, output


@pytest.mark.parametrize("world_size", [2, 3])
def test_horovod_backend_under_mpiexec(world_size: int) -> None:
    if "mpi" not in _horovod_controllers():
        pytest.skip(f"horovod was built without MPI (pip install mpich==5.0.2, then {INSTALL_HINT})")
    mpiexec = find_launcher("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich==5.0.2; scripts/setup.sh does)")
    status, output = launch(mpiexec_command(mpiexec, world_size, "horovod"), timeout=270)
    assert status == 0, f"mpiexec exited with {status}:\n{output}"
    assert f"backend_runs: horovod W={world_size}: all {1 + len(cases(world_size))} checks passed" in output, output
