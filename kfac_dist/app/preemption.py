"""Stop on SIGTERM or SIGUSR1: every rank writes one checkpoint after the same step and exits with `EXIT_PREEMPTED`.

The handler only records the signal (``StopSignals.received``); it never interrupts a step or a collective. The
trainer asks `StopSignals.agreed` at fixed step boundaries (every ``training.log_every_steps`` steps, where the log
line already reads the device, and at the end of each epoch): a one-element sum over all ranks, so a signal that
reached only some ranks, or reached them at different steps, stops every rank after the same step. The latency from
the signal to the checkpoint is therefore at most ``training.log_every_steps`` steps (an epoch's validation, if the
signal comes during it) plus one checkpoint write.

`EXIT_PREEMPTED` is 75, ``EX_TEMPFAIL`` of sysexits.h ("temporary failure; retry later"): not 0, so a job chain
with ``--dependency=afterok`` does not start on an unfinished run, and distinct from 1 (error) and 2 (bad config),
so a script (or a site's ``RequeueExit=75`` in slurm.conf) can tell "stopped with a checkpoint" apart and requeue.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

from kfac_dist.app import run_report
from kfac_dist.comm import Communicator

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopSignals"]

EXIT_PREEMPTED = 75
#: The signals that request a checkpoint and a stop: Slurm's time-limit, preemption and scancel signal, and the notice
#: the sbatch templates ask for before the time limit (``--signal=B:USR1@120``, passed on by slurm/lib.sh through srun).
#: torchrun forwards SIGTERM to its workers, and SIGUSR1 when told to (``--signals-to-handle``, as slurm/lib.sh does).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records `STOP_SIGNALS` while installed (a context manager); `agreed` turns them into one decision.

    Outside the main thread (where Python cannot install handlers) it installs nothing and never stops a run.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def ignore_after_exit(self) -> None:
        """On leaving the context, ignore `STOP_SIGNALS` instead of restoring the earlier handlers.

        For a process about to exit with `EXIT_PREEMPTED`: ``srun --kill-on-bad-exit`` (and torchrun) send SIGTERM to
        the ranks still running once the first one exits, and a rank past its checkpoint keeps its 75 (not 143).
        """
        self._previous = dict.fromkeys(self._previous, signal.SIG_IGN)

    def _record(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def agreed(self, comm: Communicator, device: torch.device) -> str | None:
        """None if no rank received a stop signal, else which (e.g. ``"SIGTERM on 1 of 2 ranks"``).

        Collective: every rank calls it after the same step, and all get the same answer.
        """
        counts = torch.tensor([float(self.received == signal.Signals(n).name) for n in STOP_SIGNALS], device=device)
        comm.allreduce(counts, average=False, category=run_report.METRICS).wait()
        found = [
            f"{signal.Signals(n).name} on {int(c)} of {comm.world_size} ranks"
            for n, c in zip(STOP_SIGNALS, run_report.host_values(counts), strict=True)
            if c > 0
        ]
        return ", ".join(found) or None
