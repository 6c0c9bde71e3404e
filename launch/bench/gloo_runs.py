"""Run a function in W real processes joined into a gloo process group (for the benchmarks).

    results = run_gloo(fn, world_size, *args)

starts ``world_size`` processes, joins them into a gloo default process group over loopback, calls
``fn(rank, world_size, *args)`` in each and returns the (pickled) return values indexed by rank. ``fn`` must be a
module-level function and ``args`` picklable.

- Children are forked from a multiprocessing forkserver that imported torch once, so a launch does not pay torch's
  import per child. Each child runs ``torch.set_num_threads(threads)`` (1 by default: one thread per process for
  anything timed) with ``OMP_NUM_THREADS`` set to the same, and ``GLOO_SOCKET_IFNAME=lo`` unless set.
- Rendezvous goes through a TCPStore the parent owns (bound to port 0, so no port can be taken in between).
- If a child fails, dies or the run exceeds ``timeout`` seconds, every child still running is killed and
  :class:`GlooRunError` names the failed ranks with their tracebacks (or the tail of their output).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist.models import build_model

__all__ = ["GlooRunError", "ProxySpec", "average_gradients", "run_gloo"]

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed"])
_GRACE_S = 5.0
_TAIL_CHARS = 3000


@dataclass(frozen=True)
class ProxySpec:
    """A model the benchmarks run on real processes: ``build_model(builder, **kwargs)`` on ``input_shape`` inputs.

    The default is ResNet-50's 54 preconditioned layers at 1/8 width (125 classes) on 32x32 inputs: the same
    layer structure as ResNet-50, small enough for several gloo processes on 2 cores.
    """

    builder: str = "resnet50"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width_multiplier": 0.125, "num_classes": 125})
    input_shape: tuple[int, ...] = (3, 32, 32)

    @property
    def num_classes(self) -> int:
        """Classes of the output layer."""
        return int(self.kwargs.get("num_classes", 1000))

    def build(self, seed: int = 0) -> nn.Module:
        """The model, weights from `seed`."""
        torch.manual_seed(seed)
        return build_model(self.builder, **self.kwargs)

    def build_meta(self) -> nn.Module:
        """The model on the meta device (shapes only, nothing allocated)."""
        with torch.device("meta"):
            return build_model(self.builder, **self.kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"builder": self.builder, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}


class GlooRunError(RuntimeError):
    """A multi-process run failed: a child raised, died or the run timed out."""


def run_gloo(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 900.0,
    pg_timeout: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in `world_size` gloo processes; return their results by rank.

    Args:
        fn: a module-level function.
        world_size: number of processes W >= 1.
        *args: picklable arguments passed after ``rank, world_size``.
        timeout: seconds the whole run may take (start-up included).
        pg_timeout: the process group's collective timeout in seconds.
        threads: torch threads per process.

    Returns:
        Each rank's return value.

    Raises:
        GlooRunError: when any process fails, dies or the run times out.
    """
    payload = pickle.dumps((fn, args))
    workdir = Path(tempfile.mkdtemp(prefix="kfac-bench-gloo-"))
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=pg_timeout), wait_for_workers=False)
    forkserver.ensure_running()
    procs: list[BaseProcess] = []
    proc: BaseProcess
    try:
        for rank in range(world_size):
            child_args = (workdir, rank, world_size, store.port, pg_timeout, threads, payload, dict(os.environ))
            proc = _CONTEXT.Process(target=_child_main, args=child_args, daemon=True)
            proc.start()
            procs.append(proc)
        _wait(procs, time.monotonic() + timeout)
        failed = [r for r, p in enumerate(procs) if not _succeeded(workdir, r, p)]
        if failed:
            raise GlooRunError(_report(getattr(fn, "__qualname__", str(fn)), workdir, procs, failed))
        return [pickle.loads((workdir / f"result{r}.pkl").read_bytes()) for r in range(world_size)]
    finally:
        for proc in procs:
            _kill(proc)
        del store
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(procs: list[BaseProcess], deadline: float) -> None:
    """Wait for every child; after a first failure or at `deadline`, kill the ones still running."""
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + _GRACE_S)
        if time.monotonic() > deadline:
            for proc in procs:
                _kill(proc)
            return
        time.sleep(0.02)


def _kill(proc: BaseProcess) -> None:
    if proc.exitcode is None:
        proc.kill()
    proc.join()


def _succeeded(workdir: Path, rank: int, proc: BaseProcess) -> bool:
    return proc.exitcode == 0 and (workdir / f"result{rank}.pkl").exists()


def _report(name: str, workdir: Path, procs: list[BaseProcess], failed: list[int]) -> str:
    lines = [f"{name} failed in {len(failed)} of {len(procs)} processes"]
    for rank in failed:
        error = workdir / f"error{rank}.txt"
        log = workdir / f"log{rank}.txt"
        detail = error.read_text() if error.exists() else (log.read_text(errors="replace") if log.exists() else "")
        why = f"exit code {procs[rank].exitcode}" if not error.exists() else "raised"
        lines += [f"--- rank {rank} ({why}) ---", detail[-_TAIL_CHARS:].rstrip() or "(no output)"]
    return "\n".join(lines)


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
    """A child: join the group, run the function, write its result (or its traceback)."""
    log = os.open(workdir / f"log{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
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
        (workdir / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown, which can hang on a broken process group


def average_gradients(model: nn.Module) -> int:
    """Average the gradients over the default group in one flat allreduce (as DDP does, without overlap).

    Returns:
        The bytes of the flat buffer (0 without a gradient or without an initialised group).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not dist.is_initialized():
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return flat.numel() * flat.element_size()
