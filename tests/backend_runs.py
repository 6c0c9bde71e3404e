"""Check a non-torch.distributed backend end to end, in the processes its own launcher starts.

    mpiexec -n W python tests/backend_runs.py mpi
    horovodrun -np W -H localhost:W --gloo python tests/backend_runs.py horovod

Every rank runs, with the backend's `Communicator`:

1. the operation checks of test_comm_ops.py (exact results and byte counts of every operation on every group,
   misuse errors, `check_same`, a collective that completes while the caller works), plus dtypes other than
   float64, a 0-d tensor, a tensor smaller than its group, and handles waited in a different order on each rank;
2. K-FAC training (tests/distributed_cases.py's model and data) for every fraction x method x factor scheme,
   with gradients averaged through the backend itself (there is no torch.distributed process group here),
   comparing the parameters with one process over the concatenated batches (relative error < 1e-6) and
   ``pre.comm_stats()`` / ``pre.memory_usage()`` with the closed form (test_distributed.py's helpers).

Each rank prints what differs; the exit status is 0 only when every check passed on every rank (the last line
of rank 0 then reads ``backend_runs: <backend> W=<W>: all <n> checks passed``). An exception aborts the whole job.
`launch` runs such a command from the pytest files, with a timeout and the output captured.
Horovod built with MPI also runs under ``mpiexec -n W python tests/backend_runs.py horovod``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from distributed_cases import (
    BASE_OPTIONS,
    LOCAL_BATCH,
    STEPS,
    Case,
    cases,
    global_batch,
    make_model,
    max_relative_error,
    reference_parameters,
)
from test_comm_ops import check_async, check_errors, check_ops, check_same_digest
from test_distributed import expected_bytes, expected_memory
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import Communicator

TOLERANCE = 1e-6
SCRIPT = os.path.abspath(__file__)


def launch(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run `cmd` in a session of its own; kill the whole session after `timeout` s. Returns (status, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"{output}\n*** killed after {timeout:.0f} s ***"


def find_launcher(name: str) -> str | None:
    """`name` (mpiexec, horovodrun) next to this interpreter (the venv's: the MPI its mpi4py loads) or on PATH."""
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


def mpiexec_command(mpiexec: str, world_size: int, backend: str) -> list[str]:
    """The command that runs this script on `world_size` ranks of this host under `mpiexec`."""
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    # Open MPI refuses root and more ranks than cores unless told; MPICH (pip's mpich) needs neither.
    extra = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return [mpiexec, *extra, "-n", str(world_size), sys.executable, SCRIPT, backend]


class Backend:
    """What the script needs from a backend besides its `Communicator`."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "mpi":
            from mpi4py import MPI

            from kfac_dist.comm.mpi import MPICommunicator

            self._mpi = MPI
            self.make_comm: Callable[[], Communicator] = MPICommunicator
        elif name == "horovod":
            import horovod.torch as hvd

            from kfac_dist.comm.horovod import HorovodCommunicator

            hvd.init(process_sets="dynamic")
            self._hvd = hvd
            self.make_comm = HorovodCommunicator
        else:
            raise SystemExit(f"unknown backend {name!r} (mpi, horovod)")

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average every gradient over all ranks through the backend (in place)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.name == "mpi":
            for grad in grads:
                self._mpi.COMM_WORLD.Allreduce(self._mpi.IN_PLACE, grad.numpy(), op=self._mpi.SUM)
                grad.div_(self._mpi.COMM_WORLD.Get_size())
        else:  # one fused Horovod operation for all of them
            self._hvd.grouped_allreduce_(grads, op=self._hvd.Average, name="backend_runs.grads")

    def abort(self) -> None:
        """End every rank of the job at once."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.name == "mpi":
            self._mpi.COMM_WORLD.Abort(1)
        os._exit(1)


def check_dtypes_and_wait_order(comm: Communicator) -> list[str]:
    """Dtypes besides float64, a 0-d tensor, fewer elements than ranks, and waits in a rank-dependent order."""
    rank, world = comm.rank, comm.world_size
    problems = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        for shape in ((), (1,), (world + 1, 3)):
            ones = torch.ones(shape, dtype=dtype)
            summed, reduced = ones * (rank + 1), ones * (rank + 1)
            bcast = ones * rank
            handles = [
                comm.allreduce(summed, average=False, category="dtypes"),
                comm.reduce(reduced, world - 1, average=False, category="dtypes"),
                comm.broadcast(bcast, world - 1, category="dtypes"),
            ]
            gather_handle, gathered = comm.allgather(ones * rank, category="dtypes")
            handles.append(gather_handle)
            # Every rank waits in another order: no backend may depend on the order of waits.
            for i in range(len(handles)):
                handles[(i + rank) % len(handles)].wait()
            total = world * (world + 1) // 2
            checks = {
                "allreduce": torch.equal(summed, ones * total),
                "reduce": rank != world - 1 or torch.equal(reduced, ones * total),
                "broadcast": torch.equal(bcast, ones * (world - 1)),
                "allgather": torch.equal(gathered, torch.stack([ones * r for r in range(world)])),
            }
            problems += [f"{op} of {dtype} {shape} is wrong" for op, ok in checks.items() if not ok]
    comm.reset_stats()
    return problems


def check_ops_on(comm: Communicator) -> list[str]:
    """test_comm_ops.py's checks on this backend, with the byte conservation summed over ranks."""
    check_errors(comm)
    stats = check_ops(comm)
    check_same_digest(comm)
    check_async(comm)
    problems = check_dtypes_and_wait_order(comm)
    # Bytes are conserved: the world's sum of sent equals the sum of received, for every operation.
    per_rank = [json.loads(text) for text in comm.gather_strings(json.dumps(stats))]
    for op in per_rank[0]:
        sent = sum(r[op]["sent"] for r in per_rank)
        received = sum(r[op]["received"] for r in per_rank)
        if sent != received:
            problems.append(f"{op}: the world sent {sent} bytes but received {received}")
    return problems


def train(backend: Backend, comm: Communicator, case: Case, rank: int, world: int) -> tuple[nn.Module, Any]:
    """tests/distributed_cases.py's training loop, gradients averaged through the backend."""
    model = make_model()
    pre = KFACPreconditioner(model, replace(BASE_OPTIONS, **case.options()), lr=0.1, communicator=comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for step in range(STEPS):
        x, y = global_batch(step, world)
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        backend.average_gradients(list(model.parameters()))
        pre.step()
        optimizer.step()
    return model, pre


def check_case(backend: Backend, case: Case, rank: int, world: int, reference: list[torch.Tensor]) -> list[str]:
    """One K-FAC configuration: parameters vs. one process; bytes and memory vs. the closed form."""
    model, pre = train(backend, backend.make_comm(), case, rank, world)
    problems = []
    error = max_relative_error([p.detach() for p in model.parameters()], reference)
    if not error < TOLERANCE:
        problems.append(f"{case}: relative error {error:.3e} >= {TOLERANCE}")
    stats = {c: v for c, v in pre.comm_stats().items() if v["sent"] or v["received"]}
    if stats != (want := expected_bytes(pre, rank)):
        problems.append(f"{case}: comm_stats {stats} != closed form {want}")
    if (memory := pre.memory_usage()) != (want_memory := expected_memory(pre, rank)):
        problems.append(f"{case}: memory_usage {memory} != closed form {want_memory}")
    return problems


def main(name: str) -> int:
    """Run every check on this rank; the exit status of the rank."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    backend = Backend(name)
    comm = backend.make_comm()
    rank, world = comm.rank, comm.world_size
    try:
        problems = check_ops_on(comm)
        all_cases = cases(world)
        references = {m: reference_parameters(world, {"compute_method": m}) for m in ("eigen", "inverse")}
        for case in all_cases:
            problems += check_case(backend, case, rank, world, references[case.compute_method])
    except BaseException:
        print(f"rank {rank}: exception\n{traceback.format_exc()}", flush=True)
        backend.abort()
    for problem in problems:
        print(f"rank {rank}: {problem}", flush=True)
    verdicts = comm.gather_strings("ok" if not problems else "failed")
    failed = [r for r, v in enumerate(verdicts) if v != "ok"]
    n_checks = 1 + len(all_cases)
    if rank == 0:
        if failed:
            print(f"backend_runs: {name} W={world}: checks failed on ranks {failed}", flush=True)
        else:
            print(f"backend_runs: {name} W={world}: all {n_checks} checks passed", flush=True)
    comm.barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1]))
