"""Every wait is bounded: a rank that stops (SIGSTOP) makes the others fail within the timeout, naming the collective.

The stopped rank stops itself inside a K-FAC collective path (its 3rd ``share_decompositions``, or before a state
rendezvous); the others must exit non-zero by themselves. Bounds are generous (they only guard against hangs:
torch's default timeout is 30 minutes); every process is SIGKILLed at the end, stopped or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from app_runs import REPO, free_port

TIMEOUT_S = 5  # the collective timeout the ranks run with
EXIT_BOUND_S = 60  # the others must have exited this long after the rank stopped (timeout + start-up slack)

# Rank STOP_RANK stops in its 3rd decomposition broadcast; then the others wait in a collective of K-FAC's own group.
STOP_IN_SHARE_DECOMPOSITIONS = """
import os, signal
from kfac_dist.exchange import Exchange

_original, _calls = Exchange.share_decompositions, []

def _stop_in_the_third(self, owned, layers):
    _calls.append(1)
    if len(_calls) == 3 and self.comm.rank == int(os.environ["STOP_RANK"]):
        os.kill(os.getpid(), signal.SIGSTOP)
    return _original(self, owned, layers)

Exchange.share_decompositions = _stop_in_the_third
"""

LIBRARY_RUN = """
import os, signal, sys
from datetime import timedelta
import torch, torch.distributed as dist
from torch import nn
from kfac_dist import KFACPreconditioner
from kfac_dist.comm import TorchDistCommunicator

rank, port, timeout, what = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=timeout))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
comm = TorchDistCommunicator()
assert comm.timeout == timedelta(seconds=timeout), comm.timeout  # K-FAC's groups: the default group's timeout
pre = KFACPreconditioner(model, communicator=comm)
for step in range(20):
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    if what == "state_dict" and step == 2:
        if rank == 0:  # rank 0 hosts the store: the rendezvous cannot even reach it
            os.kill(os.getpid(), signal.SIGSTOP)
        pre.state_dict(timeout=3.0)
    pre.step()
print("finished all steps", flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    skip = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip) and k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO), **extra)
    return env


def _is_stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def run_with_a_stopped_rank(
    commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], stop_rank: int, timeout: float = 240
) -> dict[int, tuple[int, str]]:
    """Start one process per rank; once `stop_rank` stopped itself, wait for the others to exit by themselves.

    Fails if one is still running `EXIT_BOUND_S` after the stop, or `stop_rank` does not stop within `timeout`.
    Returns every other rank's exit code and output. Every process still there at the end (the stopped one, or
    one that hangs) is SIGKILLed.
    """
    procs = [
        subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in zip(commands, envs, strict=True)
    ]
    try:
        deadline = time.monotonic() + timeout
        stopper = procs[stop_rank]
        while not _is_stopped(stopper.pid):
            assert stopper.poll() is None, f"rank {stop_rank} exited before it stopped:\n{stopper.communicate()[0]}"
            assert time.monotonic() < deadline, f"rank {stop_rank} did not stop within {timeout} s"
            time.sleep(0.1)
        results = {}
        for rank, proc in enumerate(procs):
            if rank != stop_rank:
                try:
                    out, _ = proc.communicate(timeout=EXIT_BOUND_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    pytest.fail(f"rank {rank} still waits {EXIT_BOUND_S} s after rank {stop_rank} stopped: a hang")
                results[rank] = (proc.returncode, out)
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends a stopped process too
            proc.communicate()


def test_a_stopped_rank_fails_the_other_in_a_kfac_group_collective_naming_it() -> None:
    port = str(free_port())
    commands = [
        [sys.executable, "-c", STOP_IN_SHARE_DECOMPOSITIONS + LIBRARY_RUN, str(rank), port, str(TIMEOUT_S), "train"]
        for rank in range(2)
    ]
    results = run_with_a_stopped_rank(commands, [_env(STOP_RANK="1")] * 2, stop_rank=1)
    code, out = results[0]
    assert code != 0, out
    assert "CollectiveError: broadcast(category='decomposition_broadcast') over ranks (0, 1) failed on rank 0" in out
    assert "rank 1 did not take part in time" in out, out


def test_a_state_rendezvous_whose_store_host_stopped_fails_within_its_own_timeout() -> None:
    # the process group allows 300 s; state_dict(timeout=3) must not wait for the store that long
    port = str(free_port())
    commands = [[sys.executable, "-c", LIBRARY_RUN, str(rank), port, "300", "state_dict"] for rank in range(2)]
    results = run_with_a_stopped_rank(commands, [_env()] * 2, stop_rank=0)
    code, out = results[1]
    assert code != 0, out
    assert "KFACPreconditioner.state_dict() is collective" in out, out
    assert "the process group's key-value store did not answer within 3 s" in out, out


def test_the_application_with_a_stopped_rank_exits_within_the_timeout(tmp_path: Path) -> None:
    """``comm.timeout_s`` reaches K-FAC's groups: the rank left alone fails in the decomposition broadcast."""
    port = str(free_port())
    train = "from kfac_dist.app.train import main; raise SystemExit(main(sys.argv[1:]))"
    command = [
        sys.executable, "-c", "import sys\n" + STOP_IN_SHARE_DECOMPOSITIONS + train,
        f"logging.dir={tmp_path}", "comm.backend=gloo", f"comm.timeout_s={TIMEOUT_S}", "training.epochs=1",
    ]  # fmt: skip
    launcher = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    envs = [_env(**launcher, RANK=str(r), LOCAL_RANK=str(r), STOP_RANK="1") for r in range(2)]
    results = run_with_a_stopped_rank([command] * 2, envs, stop_rank=1)
    code, out = results[0]
    assert code != 0, out
    assert "broadcast(category='decomposition_broadcast') over ranks (0, 1) failed on rank 0" in out, out
    assert "rank 1 did not take part in time" in out, out
