"""The MPI backend (`MPICommunicator`, mpi4py) in real processes under `mpiexec`, at W = 2 and 3.

Each run is tests/backend_runs.py: every Communicator operation checked exactly (results and bytes), then K-FAC
for every fraction x method x packing x factor scheme, equal to one process and to the closed-form bytes.
"""

from __future__ import annotations

import importlib.util

import pytest
from backend_runs import find_launcher, launch, mpiexec_command
from distributed_cases import cases


@pytest.mark.parametrize("world_size", [2, 3])
def test_mpi_backend_equals_single_process_with_exact_bytes(world_size: int) -> None:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py==4.1.2 mpich==5.0.2; scripts/setup.sh does)")
    mpiexec = find_launcher("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich==5.0.2; scripts/setup.sh does)")
    status, output = launch(mpiexec_command(mpiexec, world_size, "mpi"), timeout=240)
    assert status == 0, f"mpiexec exited with {status}:\n{output}"
    assert f"backend_runs: mpi W={world_size}: all {1 + len(cases(world_size))} checks passed" in output, output
