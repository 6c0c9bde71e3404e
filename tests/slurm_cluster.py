"""A real single-node Slurm cluster on loopback for the tests: its own MUNGE daemon, slurmctld and slurmd.

`slurm_cluster`, a session-scoped pytest fixture (a test module imports `slurm_cluster_fixture` to use it), starts
in a fresh directory under /tmp:

- ``munged`` with its own key and socket (slurm.conf's ``AuthInfo=socket=...`` points Slurm at it), so a MUNGE
  daemon the machine may already run is neither needed nor touched;
- ``slurmctld`` and ``slurmd -N localhost`` on two free TCP ports, with one node ``localhost`` (``127.0.0.1``)
  that has this machine's cores (at least `MIN_CPUS`, so the tests' 2-task jobs start on a 1-core machine too:
  ``SlurmdParameters=config_overrides``) and memory, no accounting, ``proctrack/linuxproc`` and ``task/none``
  (no cgroups);

waits until ``sinfo`` shows the node idle, and on teardown cancels any job left, runs ``scontrol shutdown`` and
ends the three daemons it started (by their process objects), whether or not the tests passed. Every daemon runs
in the foreground as a child of the test process, with its output in a log file that errors quote.

Needs the Debian packages ``slurm-wlm`` and ``munge`` (``scripts/install_slurm.sh``) and root (slurmd starts job
steps as the submitting user). Without them the fixture skips, and under ``KFAC_DIST_STRICT=1`` tests/conftest.py
turns that skip into a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Programs the cluster needs: the daemons and the clients the tests and templates call.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "scancel", "squeue")
#: Where Debian puts the daemons (often not on a non-root PATH).
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
START_TIMEOUT_S = 60.0
#: CPUs the node declares at least. Slurm never starts a job asking for more CPUs than a node has, and
#: ``--overcommit`` does not help an sbatch job with --ntasks-per-node or --cpus-per-task above that count.
MIN_CPUS = 4
NODE = "localhost"


def find_program(name: str) -> str | None:
    """The path of `name` on PATH or in an sbin directory, or None."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_programs() -> list[str]:
    """The programs of `PROGRAMS` that are not installed."""
    return [name for name in PROGRAMS if find_program(name) is None]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb() -> int:
    """This machine's memory in MiB (slurmd refuses a node that claims more than it has)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any launcher's or Slurm client's variables, plus `extra`.

    The tests may themselves run inside a Slurm job or under torchrun; sbatch/srun would read SLURM_*, SBATCH_*
    and SRUN_* as options, and the app would take RANK etc. as its identity.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_")) or name in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            del env[name]
    env.update(extra or {})
    return env


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a text file, or a note that it does not exist."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"({path} does not exist)"


@dataclass
class SlurmCluster:
    """A running loopback cluster: where its files are, and helpers to run Slurm commands against it.

    Attributes:
        root: Directory holding slurm.conf, state, spool, logs and the MUNGE key and socket.
        conf: The slurm.conf every client and daemon reads (``SLURM_CONF``).
        cpus: CPUs of the one node (this machine's count, at least `MIN_CPUS`).
        node: The node's name (``localhost``).
    """

    root: Path
    conf: Path
    cpus: int
    node: str = NODE
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment pointing Slurm clients at this cluster, plus `extra`."""
        return clean_env({"SLURM_CONF": str(self.conf), **(extra or {})})

    def run(
        self,
        command: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` (a Slurm client, or anything that calls one) against this cluster; output captured."""
        return subprocess.run(
            list(command), cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        """The tails of the daemons' logs, for error messages."""
        return "\n".join(f"--- {path.name} ---\n{tail(path, 1500)}" for path in sorted(self.root.glob("log/*")))

    def node_state(self) -> str:
        """The node's state as sinfo prints it (``idle``, ``alloc``, ``down*`` ...), or sinfo's error."""
        result = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], timeout=15)
        return result.stdout.strip() if result.returncode == 0 else f"sinfo failed: {result.stderr.strip()}"

    def jobs(self) -> list[str]:
        """Ids of the jobs queued, running or completing."""
        return self.run(["squeue", "-h", "-o", "%i"], timeout=15).stdout.split()

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job left (a test that timed out leaves its job behind) and wait until they are gone."""
        jobs = self.jobs()
        if not jobs:
            return
        self.run(["scancel", *jobs], timeout=15)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)


def _write_config(root: Path, cpus: int, munge_socket: Path) -> Path:
    """slurm.conf for one node on loopback; every path inside `root`."""
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# Written by tests/slurm_cluster.py: a one-node test cluster on loopback.
ClusterName=kfactest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start: a sooner start finds the
# first run's credential revoked and the job fails ("Job credential revoked"). Short, so a test sees a requeue through.
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# The main scheduling pass every 2 s (default 60 s), so a requeued job starts soon after its begin time.
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
# The node may claim more CPUs than the machine has (see MIN_CPUS): slurmd takes this file's word for it.
SlurmdParameters=config_overrides
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# sbatch --wait sleeps 2 s between polls, x4 while that is below MinJobAge / 2 (the default 300 gives 2, 8, 32 s):
# 4 keeps it at 2 s, so a test sees its job end within 2 s.
MinJobAge=4
# Job steps' default MASTER_PORT is 15000 + (job id % 200) * 100 + step id % 100 (kfac_dist/app/env.py): start
# elsewhere than 1, so two test sessions on one machine (two clusters) rarely derive the same ports.
FirstJobId={random.randrange(1, 20000)}
KillWait=5
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(memory_mb() - 512, 256)} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _start(name: str, command: list[str], root: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start a daemon in the foreground with its output in root/log/<name>.out, in its own session."""
    log = open(root / "log" / f"{name}.out", "wb")  # the child keeps its own descriptor; ours is closed below
    try:
        return subprocess.Popen(
            command,
            cwd=root,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _wait_for(what: str, ready: Callable[[], bool], cluster: SlurmCluster, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `ready` until it is true; fail early, quoting the logs, when a daemon exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in cluster.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode} while waiting for {what}\n{cluster.logs()}"
                )
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def _stop(cluster: SlurmCluster) -> None:
    """Cancel jobs, shut Slurm down, then end whatever of ours still runs; never raises."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        for step in (cluster.cancel_all, lambda: cluster.run(["scontrol", "shutdown"], timeout=20)):
            try:
                step()
            except (OSError, subprocess.SubprocessError):
                pass
    for name in ("slurmd", "slurmctld", "munged"):  # munged last: Slurm talks to it while shutting down
        process = cluster.daemons.get(name)
        if process is None:
            continue
        try:
            process.wait(timeout=0 if name == "munged" else 15)  # scontrol shutdown ends the Slurm daemons
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def start_cluster() -> Iterator[SlurmCluster]:
    """Start the cluster, yield it, and stop it (see the module docstring); skip when Slurm or root is missing."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): run `bash scripts/install_slurm.sh`")
    if os.geteuid() != 0:
        pytest.skip("the loopback Slurm cluster needs root: slurmd starts job steps as the submitting user")

    # A short path under /tmp: MUNGE's socket path must fit a sockaddr_un (108 bytes), and munged wants its socket
    # directory searchable by everyone, which pytest's private tmp_path is not.
    root = Path(tempfile.mkdtemp(prefix="kfac-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o711)
    munge_dir.chmod(0o711)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = munge_dir / "munge.socket"

    cpus = max(os.cpu_count() or 1, MIN_CPUS)
    conf = _write_config(root, cpus, munge_socket)
    cluster = SlurmCluster(root=root, conf=conf, cpus=cpus)
    env = cluster.env()
    try:
        cluster.daemons["munged"] = _start(
            "munged",
            [
                str(find_program("munged")),
                "--foreground",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={root / 'log' / 'munged.log'}",
            ],
            root,
            env,
        )
        _wait_for("the MUNGE socket", munge_socket.exists, cluster)
        cluster.daemons["slurmctld"] = _start(
            "slurmctld", [str(find_program("slurmctld")), "-D", "-i", "-f", str(conf)], root, env
        )
        cluster.daemons["slurmd"] = _start(
            "slurmd", [str(find_program("slurmd")), "-D", "-N", NODE, "-f", str(conf)], root, env
        )
        _wait_for(f"sinfo to show node {NODE} idle", lambda: cluster.node_state() == "idle", cluster)
        yield cluster
    finally:
        _stop(cluster)
        if os.environ.get("KFAC_DIST_KEEP_SLURM") == "1":
            print(f"slurm_cluster: kept {root} (KFAC_DIST_KEEP_SLURM=1)")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster on loopback for the whole session (see the module docstring)."""
    yield from start_cluster()
