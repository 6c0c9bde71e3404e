"""What the training application tells the user: the start-up block, the periodic log line, numerical fallbacks.

Everything here is written for a Slurm output file first: plain lines, flushed as they are written. A carriage-return
progress bar is drawn only when ``logging.progress_bar`` is on and stderr is a terminal.

The trainer keeps its metric sums on the training device and reads them back only through :func:`host_values`, once
per logging interval and at the end of an epoch; K-FAC's share of the step time is measured by :class:`SpanTimer`
without synchronising the device (CUDA events, read after that host read).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.config import Config
from kfac_dist.app.units import mib
from kfac_dist.comm import Communicator
from kfac_dist.planner import plan_model

#: The communicator category of the run's metric, stop and health reductions (``comm_stats()`` counts them apart).
METRICS = "metrics"

#: How ``training.amp`` runs, in words.
PRECISIONS = {
    "none": "fp32 (training.amp=none)",
    "bf16": "bf16 autocast (training.amp=bf16)",
    "fp16": "fp16 autocast with gradient scaling (training.amp=fp16)",
}
#: Layer names listed in the start-up block per group before the rest is only counted.
MAX_NAMES = 10


def host_values(tensor: torch.Tensor) -> list[float]:
    """The values of a metrics tensor on the host: the trainer's only device-to-host read (a sync on CUDA)."""
    return [float(v) for v in tensor.tolist()]


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f", ... ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def _layer_lines(pre: KFACPreconditioner) -> list[str]:
    report = pre.report()
    lines = [
        f"  layers: {len(report.preconditioned)} preconditioned, {len(report.skipped)} skipped (kfac.skip_layers), "
        f"{len(report.unsupported)} unsupported (left to the optimizer as they are)",
        f"    preconditioned: {_names(report.preconditioned) or '-'}",
    ]
    lines += [f"    skipped {name} (pattern {pattern!r})" for name, pattern in report.skipped.items()]
    by_reason: dict[str, list[str]] = {}
    for name, reason in report.unsupported.items():
        by_reason.setdefault(reason, []).append(name)
    lines += [f"    unsupported ({reason}): {_names(names)}" for reason, names in by_reason.items()]
    return lines


def _plan_lines(
    cfg: Config, model: nn.Module, pre: KFACPreconditioner, world_size: int, steps_per_epoch: int
) -> list[str]:
    """Per-rank memory and bytes per step that :func:`kfac_dist.planner.plan_model` predicts for this run now."""
    options = pre.options.at_step(pre.steps)
    report = plan_model(model, world_size, options)
    s = report.summary()
    return [
        f"  K-FAC: {report.plan.grad_workers} grad worker(s) per layer (kfac.grad_worker_fraction="
        f"{cfg.kfac.grad_worker_fraction}), factors every {options.factor_update_steps} step(s), decompositions "
        f"every {options.inv_update_steps}",
        f"  K-FAC memory per rank (planned): max {mib(s['memory_max'])} MiB, mean {mib(s['memory_mean'])} MiB",
        f"  K-FAC traffic per rank per step (planned; sent + received, averaged over the schedule): "
        f"max {mib(s['amortised_max'])} MiB, mean {mib(s['amortised_mean'])} MiB",
    ]


def startup_block(
    cfg: Config,
    *,
    comm: Communicator,
    device: torch.device,
    model: nn.Module,
    pre: KFACPreconditioner | None,
    steps_per_epoch: int,
) -> str:
    """The block rank 0 prints before training: where and how the run runs, and what K-FAC will do."""
    limit = f", stopping at training.max_steps={cfg.training.max_steps}" if cfg.training.max_steps else ""
    lines = [
        f"kfac-dist train: {cfg.model.name} on {cfg.data.name}, {cfg.training.epochs} epoch(s) of {steps_per_epoch} "
        f"steps{limit}",
        f"  world size {comm.world_size}, backend {comm.name}, device {device}, "
        f"precision {PRECISIONS[cfg.training.amp]}",
    ]
    if pre is None:
        lines.append("  K-FAC: off (kfac.enabled=false): the optimizer alone")
    else:
        lines += _plan_lines(cfg, model, pre, comm.world_size, steps_per_epoch) + _layer_lines(pre)
    return "\n".join(lines)


class SpanTimer:
    """Seconds spent in marked spans, without synchronising the device.

    On CUDA each span records a pair of events; :meth:`collect` reads them, so call it only after a host read
    has synchronised the stream (at a logging interval). Elsewhere spans are timed with ``time.perf_counter``.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        """Time the enclosed block."""
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        began = time.perf_counter()
        yield
        self._seconds += time.perf_counter() - began

    def collect(self) -> float:
        """Seconds in spans since the last call (waits for the recorded events)."""
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        seconds, self._seconds, self._events = self._seconds, 0.0, []
        return seconds


def _duration(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """Rank 0's log line every ``training.log_every_steps`` steps, as a plain line or (on a terminal) a bar.

    Args:
        epochs: ``training.epochs``.
        steps_per_epoch: Optimizer steps per epoch.
        total_steps: Steps the whole run takes (``training.max_steps`` if it comes first).
        enabled: False on every rank but 0.
        bar: Draw a carriage-return bar on stderr instead of printing lines.
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, total_steps: int, enabled: bool, bar: bool) -> None:
        self.epochs, self.steps_per_epoch, self.total_steps = epochs, steps_per_epoch, total_steps
        self.enabled, self.bar = enabled, bar
        self._last = [0.0, 0.0, 0.0]
        self._last_step = 0
        self._last_time = time.perf_counter()
        self._drawn = False

    def start_epoch(self, global_step: int) -> None:
        """Restart the interval at the beginning of an epoch (its sums start at zero)."""
        self._last, self._last_step, self._last_time = [0.0, 0.0, 0.0], global_step, time.perf_counter()

    def log(
        self,
        *,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        sums: list[float],
        lr: float,
        kfac_seconds: float | None,
    ) -> None:
        """Report the interval that ended at ``global_step``; ``sums`` are the epoch's (loss sum, correct, count)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        steps, seconds = max(global_step - self._last_step, 1), now - self._last_time
        loss_sum, count = sums[0] - self._last[0], sums[2] - self._last[2]
        self._last, self._last_step, self._last_time = list(sums), global_step, now
        share = "no K-FAC" if kfac_seconds is None else f"K-FAC {kfac_seconds / max(seconds, 1e-9):.0%}"
        eta = (self.total_steps - global_step) * seconds / steps
        line = (
            f"epoch {epoch + 1}/{self.epochs} step {global_step}/{self.total_steps}: loss "
            f"{loss_sum / max(count, 1.0):.4f}, lr {lr:.4g}, {1000 * seconds / steps:.1f} ms/step ({share}), "
            f"ETA {_duration(eta)}"
        )
        if self.bar:
            done = step_in_epoch / self.steps_per_epoch
            sys.stderr.write(f"\r[{'#' * int(30 * done):<30}] {line}")
            sys.stderr.flush()
            self._drawn = True
        else:
            print(line, flush=True)

    def end_epoch(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


class HealthWatch:
    """Reports increases of the preconditioner's numerical-fallback counters (``pre.health()``) on this rank."""

    def __init__(self, rank: int, counters: Mapping[str, int]) -> None:
        self.rank = rank
        self._seen = dict(counters)

    def check(self, counters: Mapping[str, int], global_step: int) -> None:
        """Print one line per counter that grew since the last check."""
        for name, total in counters.items():
            grown = total - self._seen.get(name, 0)
            if grown > 0:
                print(
                    f"rank {self.rank}: K-FAC numerical fallback by step {global_step}: {name} +{grown} "
                    f"({total} in total)",
                    flush=True,
                )
        self._seen = dict(counters)
