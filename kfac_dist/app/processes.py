"""Run a function in W real processes joined into a gloo group, and fail loudly when any of them fails.

    results = run_gloo(fn, world_size, *args)

starts ``world_size`` processes, joins them into a gloo default process group, calls
``fn(rank, world_size, *args)`` in each, and returns their return values (pickled), indexed by rank.
``fn`` and ``args`` must be picklable (``fn`` a module-level function).

The benchmarks (:mod:`kfac_dist.app.bench`) and the multi-process tests run on it.

- Children are forked from a multiprocessing forkserver that imported torch once per session, so a run
  does not pay torch's import (seconds on a small machine) per child; its one-time start does not count
  against ``timeout``. Each child takes the parent's current environment, runs with ``threads`` torch threads
  (``OMP_NUM_THREADS`` set to match; 1 by default: one thread per process for anything timed) and
  ``GLOO_SOCKET_IFNAME=lo`` (unless set), and writes its output to a log file.
- Rendezvous goes through a TCPStore the parent owns (bound to port 0), so no port can be taken between
  choosing and binding it.
- A run fails with :class:`GlooRunError` when any child exits with a non-zero code, is killed, or exits
  without a result, and when the run exceeds ``timeout`` seconds; every child still running is then killed.
  The message holds each failed rank's traceback (or the tail of its output; ranks the harness kills first
  dump their Python stacks there) and names the rank that failed first.
- After a first failure the others get ``pg_timeout`` seconds plus a grace period to fail by themselves
  (gloo errors or the collective timeout) before they are killed.
"""

from __future__ import annotations

import faulthandler
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_GRACE_S = 3.0
_STACK_DUMP_S = 0.5
_TAIL_CHARS = 4000
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "numpy"])


__all__ = ["GlooRunError", "run_gloo"]


class GlooRunError(RuntimeError):
    """A multi-process run failed: a child failed, died or timed out."""


def run_gloo(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 20.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in `world_size` processes; return their results by rank.

    `timeout` bounds the whole run (start-up included); `pg_timeout` is the collective timeout of the group;
    `threads` is each child's torch thread count.

    Raises:
        GlooRunError: naming the failed ranks with their tracebacks (or the tails of their output).
    """
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    payload = pickle.dumps((fn, args))  # fails here, in the parent, for an unpicklable function
    workdir = Path(tempfile.mkdtemp(prefix="kfac-gloo-"))
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=pg_timeout), wait_for_workers=False)
    procs: list[BaseProcess] = []
    forkserver.ensure_running()  # its one-time start (importing torch) does not count against `timeout`
    start = time.monotonic()
    try:
        for rank in range(world_size):
            child_args = (workdir, rank, world_size, store.port, pg_timeout, threads, payload, dict(os.environ))
            proc = _CONTEXT.Process(target=_child_main, args=child_args, daemon=True)
            proc.start()
            procs.append(proc)
        exit_order, killed = _supervise(procs, workdir, start + timeout, pg_timeout + _GRACE_S)
        elapsed = time.monotonic() - start
        if any(not _succeeded(workdir, r, p) for r, p in enumerate(procs)):
            raise GlooRunError(_report(name, workdir, procs, exit_order, killed, elapsed, timeout))
        return [pickle.loads((workdir / f"result{r}.pkl").read_bytes()) for r in range(world_size)]
    finally:
        for child in procs:
            _kill(child)
        del store
        shutil.rmtree(workdir, ignore_errors=True)


def _supervise(
    procs: list[BaseProcess], workdir: Path, deadline: float, after_failure_s: float
) -> tuple[list[int], set[int]]:
    """Wait for every child; kill the rest at `deadline`, or `after_failure_s` after a first failure.

    Returns the ranks in the order they failed and the ranks that were killed. Ranks seen exiting in the same
    poll are ordered by the failure times they recorded, those that died without recording one (no traceback)
    first: the others' errors are usually the consequence (a peer closed the connection).
    """
    exit_order: list[int] = []
    killed: set[int] = set()
    while len(exit_order) < len(procs):
        exited = [r for r, p in enumerate(procs) if r not in exit_order and p.exitcode is not None]
        exit_order += sorted(exited, key=lambda r: _failure_time(workdir, r))
        if any(procs[r].exitcode != 0 for r in exited):
            deadline = min(deadline, time.monotonic() + after_failure_s)
        if time.monotonic() > deadline:
            stuck = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
            for rank in stuck:  # ask for Python stacks in their logs before killing them
                os.kill(procs[rank].pid or 0, signal.SIGUSR1)
            time.sleep(_STACK_DUMP_S)
            for rank in stuck:
                _kill(procs[rank])
            killed.update(stuck)
            exit_order += [rank for rank in stuck if rank not in exit_order]
        time.sleep(0.02)
    return exit_order, killed


def _failure_time(workdir: Path, rank: int) -> float:
    path = workdir / f"failed_at{rank}.txt"
    return float(path.read_text()) if path.exists() else -math.inf


def _kill(proc: BaseProcess) -> None:
    if proc.exitcode is None:
        proc.kill()
    proc.join()


def _succeeded(workdir: Path, rank: int, proc: BaseProcess) -> bool:
    return proc.exitcode == 0 and (workdir / f"result{rank}.pkl").exists()


def _report(
    name: str,
    workdir: Path,
    procs: list[BaseProcess],
    exit_order: list[int],
    killed: set[int],
    elapsed: float,
    timeout: float,
) -> str:
    failed = [r for r in exit_order if not _succeeded(workdir, r, procs[r])]
    lines = [f"{name} failed in {len(failed)} of {len(procs)} processes ({elapsed:.1f} s); first: rank {failed[0]}"]
    for rank in failed:
        code = procs[rank].exitcode
        assert code is not None
        if rank in killed:
            why = f"killed by the harness (run timeout {timeout:.0f} s, or still running after a failure)"
        elif code < 0:
            why = f"killed by signal {signal.Signals(-code).name}"
        elif code != 0:
            why = f"exit code {code}"
        else:
            why = "exit code 0 without writing a result"
        error_file = workdir / f"error{rank}.txt"
        detail = error_file.read_text() if error_file.exists() else _tail(workdir / f"log{rank}.txt")
        lines += [f"--- rank {rank}: {why} ---", detail.rstrip()]
    return "\n".join(lines)


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return ("output (tail):\n" + text[-_TAIL_CHARS:]) if text.strip() else "(no output)"


def _child_main(
    workdir: Path,
    rank: int,
    world_size: int,
    port: int,
    pg_timeout_s: float,
    threads: int,
    payload: bytes,
    environ: dict[str, str],
) -> None:
    """Entry point of a child process: join the group, run the function, write its result or traceback."""
    log = os.open(workdir / f"log{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        fn, args = pickle.loads(payload)
        pg_timeout = timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, None, False, pg_timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=pg_timeout)
        result = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        partial = workdir / f"result{rank}.pkl.partial"
        partial.write_bytes(pickle.dumps(result))
        partial.rename(workdir / f"result{rank}.pkl")
    except BaseException:
        (workdir / f"failed_at{rank}.txt").write_text(repr(time.time()))
        (workdir / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown, which can hang on a broken process group
