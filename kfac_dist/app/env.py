"""Where am I running? Detect the launcher's environment and start the process group.

`detect_env` reads the variables each launcher sets and returns a `RunEnv`. The first rule that matches wins:

1. **torchrun** (or any ``env://``-style launcher): ``RANK`` and ``WORLD_SIZE`` are set. ``LOCAL_RANK`` /
   ``LOCAL_WORLD_SIZE`` default to ``RANK`` / ``WORLD_SIZE`` (one host) when absent.
2. **Slurm** ``srun``: ``SLURM_PROCID`` and a plain step number in ``SLURM_STEP_ID`` are set. ``srun`` sets
   ``SLURM_STEP_ID`` in every task it starts; the shell of an ``sbatch`` script has ``SLURM_PROCID=0`` and the
   job's ``SLURM_NTASKS`` (say 4) but no ``SLURM_STEP_ID`` (Slurm 22.05; newer Slurm gives its batch/extern/
   interactive steps ids >= 0xFFFFFFF0), and runs one process: it falls through to the rules below (single).
   Size: ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``); local rank: ``SLURM_LOCALID``; local size:
   ``SLURM_STEP_TASKS_PER_NODE`` (``"4(x2),3"``) at ``SLURM_NODEID``. An MPI launcher inside a job starts its
   proxies with ``srun`` (MPICH's ``mpiexec`` in ``sbatch``: every rank sees ``SLURM_PROCID=0`` of 1): when MPI
   variables are set and disagree with the step's rank or size, the MPI rule is used instead.
3. **Open MPI** ``mpirun``: ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK`` / ``_LOCAL_SIZE``.
4. **MPICH / Intel MPI (Hydra, PMI)** ``mpiexec``: ``PMI_RANK`` / ``PMI_SIZE``, ``MPI_LOCALRANKID`` /
   ``MPI_LOCALNRANKS`` (``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` are accepted in their place).
5. **single**: none of the above; rank 0 of 1.

Master address: ``MASTER_ADDR`` when set (always wins). Otherwise Slurm uses the first host of the step's
``SLURM_STEP_NODELIST`` (task 0 runs there; else ``SLURM_JOB_NODELIST``), parsed here without ``scontrol``;
every launcher uses ``127.0.0.1`` when all ranks are on this host (local size == world size); a multi-host
torchrun/MPI run without ``MASTER_ADDR`` is an error.
Master port: ``MASTER_PORT`` when set; else, inside a Slurm job, `slurm_port` of ``SLURM_JOB_ID`` and
``SLURM_STEP_ID`` (every rank of a step computes the same port, and two steps of one job, ``srun ... & srun ... &``,
or two jobs sharing a node get different ones; a process outside any srun step, e.g. started by an ``mpiexec`` in
the batch script, counts as in the batch script's step, Slurm's id 0xFFFFFFFB); else 29500 (torch's default).

Same run: `init_distributed` checks, right after joining, that every rank of the group belongs to the same run: it
gathers each rank's `run_identity` (job id, step id, torchrun's run id, the config's fingerprint) and fails on
every rank, naming the ranks that differ, when one came from another job step, launch or config.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kfac_dist.comm.backends import AUTO, resolve_backend
from kfac_dist.comm.backends import BACKENDS as COMM_BACKENDS

__all__ = [
    "BACKENDS",
    "LaunchEnvError",
    "RunEnv",
    "cuda_device_index",
    "detect_env",
    "expand_hostlist",
    "init_distributed",
    "run_identity",
    "shutdown_distributed",
    "slurm_port",
]

#: What `init_distributed` can start: ``auto`` and the rows of :data:`kfac_dist.comm.backends.BACKENDS` that are
#: ``torch.distributed`` process groups.
BACKENDS = (AUTO, *(name for name, backend in COMM_BACKENDS.items() if backend.process_group))
DEFAULT_PORT = 29500
#: Ports of Slurm job steps: ``SLURM_PORT_BASE + (job % SLURM_PORT_JOBS) * SLURM_PORT_STEPS + step % SLURM_PORT_STEPS``.
SLURM_PORT_BASE, SLURM_PORT_JOBS, SLURM_PORT_STEPS = 15000, 200, 100
_SLURM_SPECIAL_STEP = 0xFFFFFFF0  # batch, extern, interactive, pending steps have ids above this
_SLURM_BATCH_STEP = 0xFFFFFFFB  # the batch script's step: a process outside any srun step counts as in it


_Found = tuple[str, int, int, int, int]  # launcher, rank, size, local rank, local size


class LaunchEnvError(ValueError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class RunEnv:
    """This process's place in the run, as the launcher described it.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"``, ``"mpi"`` or ``"single"``.
        rank: Global rank in ``[0, world_size)``.
        world_size: Number of processes in the run.
        local_rank: Rank among the processes on this host; selects the GPU.
        local_world_size: Number of processes on this host.
        master_addr: Host of rank 0's rendezvous store.
        master_port: Port of that store.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        """The ``tcp://`` rendezvous URL (IPv6 addresses in brackets)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def detect_env(environ: Mapping[str, str] = os.environ) -> RunEnv:
    """Detect the launcher from `environ` (see the module docstring for the rules) and validate its values.

    Raises:
        LaunchEnvError: A value is not an integer, out of range, or a needed variable is missing; the message
            names the variable.
    """
    found = _torchrun(environ) or _horovodrun(environ) or _slurm(environ) or _mpi(environ)
    launcher, rank, size, local_rank, local_size = found or ("single", 0, 1, 0, 1)
    addr = environ.get("MASTER_ADDR")
    if not addr and launcher == "slurm":
        nodelist = "SLURM_STEP_NODELIST" if environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
        addr = expand_hostlist(_need(environ, nodelist), nodelist)[0]
    elif not addr and local_size == size:
        addr = "127.0.0.1"
    if addr is None:
        raise LaunchEnvError(
            f"{launcher}: the {size} ranks span several hosts ({local_size} on this one) and MASTER_ADDR is not set; "
            "set MASTER_ADDR to the address of rank 0's host"
        )
    return RunEnv(launcher, rank, size, local_rank, local_size, addr, _port(environ))


def _torchrun(environ: Mapping[str, str]) -> _Found | None:
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    rank, size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE", minimum=1)
    if "LOCAL_WORLD_SIZE" in environ:
        local_rank, local_size = _int(environ, "LOCAL_RANK"), _int(environ, "LOCAL_WORLD_SIZE", minimum=1)
    else:  # a hand-made env:// setup: assume one host
        local_rank, local_size = (_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank), size
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return _checked("torchrun", names, (rank, size, local_rank, local_size))


def _horovodrun(environ: Mapping[str, str]) -> _Found | None:
    """``horovodrun --gloo`` sets HOROVOD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE (under mpirun the MPI rules apply)."""
    if "HOROVOD_RANK" not in environ or "HOROVOD_SIZE" not in environ:
        return None
    names = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE")
    values = (
        _int(environ, names[0]),
        _int(environ, names[1], minimum=1),
        _int(environ, names[2]),
        _int(environ, names[3], minimum=1),
    )
    return _checked("horovodrun", names, values)


def _slurm(environ: Mapping[str, str]) -> _Found | None:
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    if "SLURM_PROCID" not in environ or step is None or not step.isdigit() or int(step) >= _SLURM_SPECIAL_STEP:
        return None  # not a task started by srun: e.g. the shell of an sbatch script
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    rank, size = _int(environ, "SLURM_PROCID"), _int(environ, size_var, minimum=1)
    mpi = _mpi_names(environ)
    if mpi and (environ.get(mpi[0], "").strip(), environ.get(mpi[1], "").strip()) != (str(rank), str(size)):
        return None  # an MPI launcher inside the step (its daemons started by srun): MPI's ranks are the run's
    local_rank = _int(environ, "SLURM_LOCALID")
    per_node_var = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    if per_node_var in environ:
        node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        local_size = _tasks_on_node(per_node_var, environ[per_node_var], node)
    else:
        local_size = size
    names = ("SLURM_PROCID", size_var, "SLURM_LOCALID", per_node_var)
    return _checked("slurm", names, (rank, size, local_rank, local_size))


def _mpi_names(environ: Mapping[str, str]) -> tuple[str, str, str, str] | None:
    """The variables holding rank, size, local rank and local size for Open MPI or Hydra/PMI, if either is set."""
    if "OMPI_COMM_WORLD_RANK" in environ:
        prefix = "OMPI_COMM_WORLD_"
        return prefix + "RANK", prefix + "SIZE", prefix + "LOCAL_RANK", prefix + "LOCAL_SIZE"
    if "PMI_RANK" in environ:
        hydra = "MPI_LOCALRANKID" in environ or "LOCAL_RANK" not in environ  # else take LOCAL_RANK/_WORLD_SIZE
        local, local_size = ("MPI_LOCALRANKID", "MPI_LOCALNRANKS") if hydra else ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
        return "PMI_RANK", "PMI_SIZE", local, local_size
    return None


def _mpi(environ: Mapping[str, str]) -> _Found | None:
    names = _mpi_names(environ)
    if names is None:
        return None
    rank, size = _int(environ, names[0]), _int(environ, names[1], minimum=1)
    local_rank, local_size = _int(environ, names[2]), _int(environ, names[3], minimum=1)
    return _checked("mpi", names, (rank, size, local_rank, local_size))


def _checked(launcher: str, names: tuple[str, str, str, str], values: tuple[int, int, int, int]) -> _Found:
    """Check rank < size, local rank < local size, local size <= size; name the variables in the error."""
    rank, size, local_rank, local_size = values
    for small, big in ((0, 1), (2, 3)):
        if values[small] >= values[big]:
            raise LaunchEnvError(f"{launcher}: {names[small]}={values[small]} is not < {names[big]}={values[big]}")
    if local_size > size:
        raise LaunchEnvError(f"{launcher}: {names[3]}={local_size} is larger than {names[1]}={size}")
    return launcher, rank, size, local_rank, local_size


def _need(environ: Mapping[str, str], name: str) -> str:
    if not environ.get(name):
        raise LaunchEnvError(f"{name} is not set")
    return environ[name]


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    text = _need(environ, name).strip()
    try:
        value = int(text)
    except ValueError:
        raise LaunchEnvError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise LaunchEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _port(environ: Mapping[str, str]) -> int:
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", minimum=1)
        if port > 65535:
            raise LaunchEnvError(f"MASTER_PORT={port} must be <= 65535")
        return port
    if environ.get("SLURM_JOB_ID"):
        step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "")).strip()
        return slurm_port(_int(environ, "SLURM_JOB_ID"), int(step) if step.isdigit() else _SLURM_BATCH_STEP)
    return DEFAULT_PORT


def slurm_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of Slurm job step `step_id` of job `job_id` (slurm/lib.sh computes the same).

    ``15000 + (job_id % 200) * 100 + step_id % 100``, in [15000, 35000): distinct for the first 100 steps of a job
    and for any 200 consecutive job ids, so concurrent steps of one job, and jobs submitted close together that
    share a node, never meet at one port; beyond that, ports repeat (set ``MASTER_PORT`` to choose one).
    """
    return SLURM_PORT_BASE + (job_id % SLURM_PORT_JOBS) * SLURM_PORT_STEPS + step_id % SLURM_PORT_STEPS


def _tasks_on_node(name: str, spec: str, node: int) -> int:
    """Tasks on node `node` from Slurm's compressed per-node counts, e.g. ``"4(x2),3"`` = 4, 4, 3."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LaunchEnvError(f"{name}={spec!r} is not a Slurm task count list like '4(x2),3'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node >= len(counts):
        raise LaunchEnvError(f"SLURM_NODEID={node} is not < the {len(counts)} nodes of {name}={spec!r}")
    return counts[node]


def expand_hostlist(hostlist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm hostlist: ``"node[01-03,07],gpu-a[1-2]"`` -> node01, node02, node03, node07, gpu-a1, gpu-a2.

    Supports several comma-separated host expressions, several ranges and single numbers per bracket, zero
    padding (the width of a range's lower bound, as Slurm does), and several brackets in one name
    (``rack[1-2]-n[1-2]``: every combination, leftmost bracket slowest).

    Raises:
        LaunchEnvError: Unbalanced brackets, an empty name, or a bad range; the message quotes `name`=`hostlist`.
    """
    hosts: list[str] = []
    for expression in _split_top_level(hostlist, name):
        names = [""]
        for text, bracket in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", expression):
            names = [host + text + suffix for host in names for suffix in _expand_bracket(hostlist, name, bracket)]
        hosts += names
    return hosts


def _split_top_level(hostlist: str, name: str) -> list[str]:
    """Split at commas outside brackets; check the brackets balance."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchEnvError(f"{name}={hostlist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(hostlist[start:i].strip())
            start = i + 1
    if depth != 0 or any(not part or part.startswith("[") for part in parts):
        raise LaunchEnvError(f"{name}={hostlist!r} is not a Slurm hostlist like 'node[01-04,07]'")
    return parts


def _expand_bracket(hostlist: str, name: str, bracket: str) -> list[str]:
    if not bracket:
        return [""]
    out: list[str] = []
    for item in bracket.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise LaunchEnvError(f"{name}={hostlist!r}: bad range {item!r} in [{bracket}]")
        low, high = match.group(1), match.group(2) or match.group(1)
        out += [str(number).zfill(len(low)) for number in range(int(low), int(high) + 1)]
    return out


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The GPU of this process: one per local rank, or the only visible one when Slurm binds one GPU per task.

    Raises:
        LaunchEnvError: Fewer visible GPUs than local ranks (and more than one visible).
    """
    if device_count >= local_world_size:
        return local_rank
    if device_count == 1:
        return 0  # e.g. srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds this task's GPU only
    raise LaunchEnvError(
        f"{local_world_size} processes on this host but {device_count} visible CUDA devices: one GPU per local rank "
        "(or exactly one visible GPU per process) is needed"
    )


def init_distributed(
    env: RunEnv,
    backend: str = "auto",
    timeout_s: float = 1800.0,
    *,
    force: bool = False,
    run_id: str | None = None,
) -> str:
    """Select this rank's GPU and join the default process group; return the backend name.

    Args:
        env: From `detect_env`.
        backend: One of :data:`BACKENDS`: ``"auto"`` (nccl when CUDA is available, else gloo), ``"nccl"``,
            ``"gloo"`` or ``"mpi"`` (torch's own MPI process group).
        timeout_s: Collective and rendezvous timeout in seconds; K-FAC's own process groups take it from the
            default group (:class:`kfac_dist.comm.TorchDistCommunicator`).
        force: Start a process group even with world size 1 (by default a single process starts none, and
            the library runs its world-size-1 path).
        run_id: This rank's `run_identity`; when given, every rank's is gathered right after joining, and a
            group whose ranks differ is left and refused.

    On CUDA, ``torch.cuda.set_device`` selects `cuda_device_index` first. Rendezvous is ``env.init_method``
    (``tcp://master:port``); the ``mpi`` backend takes rank and size from MPI itself.

    Raises:
        LaunchEnvError: Unknown backend, nccl without CUDA, too few GPUs, or ranks of different runs (naming them).
        RuntimeError: A default process group already exists.
    """
    if backend not in BACKENDS:
        raise LaunchEnvError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if timeout_s <= 0:
        raise LaunchEnvError(f"timeout_s={timeout_s} must be > 0")
    cuda = torch.cuda.is_available()
    chosen = resolve_backend(backend, cuda)
    resolved = chosen.name
    missing = chosen.missing()
    if missing is not None:
        raise LaunchEnvError(f"backend={resolved!r} {missing}; use 'gloo' or 'auto'")
    device = None
    if cuda:
        device = torch.device(
            "cuda", cuda_device_index(env.local_rank, env.local_world_size, torch.cuda.device_count())
        )
        torch.cuda.set_device(device)
    if env.world_size == 1 and not force:
        return resolved
    if dist.is_initialized():
        raise RuntimeError("init_distributed: a default process group is already initialized")
    timeout = timedelta(seconds=timeout_s)
    if not chosen.rendezvous:
        dist.init_process_group(resolved, timeout=timeout)
    else:
        dist.init_process_group(
            resolved,
            init_method=env.init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if "cpu" not in chosen.devices else None,  # a GPU-only group binds this rank's GPU
        )
    if run_id is not None:
        _check_same_run(run_id)
    return resolved


def run_identity(config: str, environ: Mapping[str, str] = os.environ) -> str:
    """What every rank of one run shares: its Slurm job and step, torchrun's run id, and a hash of `config`.

    Args:
        config: The run's resolved config as text (e.g. ``format_config(cfg)``); only its hash is kept.
        environ: The launcher's variables.
    """
    parts = []
    if environ.get("SLURM_JOB_ID"):
        step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID")) or "batch"
        parts.append(f"slurm job {environ['SLURM_JOB_ID']} step {step}")
    if environ.get("TORCHELASTIC_RUN_ID"):
        parts.append(f"torchrun run {environ['TORCHELASTIC_RUN_ID']}")
    parts.append(f"config {hashlib.sha256(config.encode()).hexdigest()[:16]}")
    return ", ".join(parts)


def _check_same_run(run_id: str) -> None:
    """Gather every rank's `run_id`; leave the group and raise on every rank when any differs from rank 0's."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, run_id)
    differ = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
    if differ:
        shutdown_distributed()
        ranks = f"rank {differ[0]} belongs" if len(differ) == 1 else f"ranks {', '.join(map(str, differ))} belong"
        details = "; ".join(f"rank {rank}: {gathered[rank]}" for rank in [0, *differ[:3]])
        raise LaunchEnvError(
            f"{ranks} to another run than rank 0 ({details}): two launches met at "
            "one rendezvous address (set MASTER_PORT per launch) or the ranks were given different configs"
        )


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists (safe to call when none does)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
