"""Clocks of the overhead benchmark's device protocol: the seconds of a block of steps, without per-step syncs.

A :class:`Clock` times a block (``start()`` ... ``stop()``) and can wait for the device (``sync()``, for the
profiled blocks' region boundaries). On the CPU every operator has finished when it returns, so the wall clock is
the block's time (:class:`WallClock`). On CUDA kernels run asynchronously: :class:`CudaClock` records an event on
the current stream at the start and at the end of the block and reads the time between them once, after the end
event has completed (https://pytorch.org/docs/stable/generated/torch.cuda.Event.html), so the steps in between
never wait for the GPU.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

__all__ = ["Clock", "CudaClock", "WallClock", "clock_for"]


class Clock(Protocol):
    """Times one block at a time."""

    def start(self) -> None:
        """Mark the start of a block."""

    def stop(self) -> float:
        """Seconds from the last :meth:`start` to now, once the device has done the work queued until now."""

    def sync(self) -> None:
        """Wait until the device has done the work queued so far."""


class WallClock:
    """The host's wall clock (``time.perf_counter``): the clock of a device whose operators are synchronous."""

    def __init__(self) -> None:
        self._start: float | None = None

    def start(self) -> None:
        """Mark the start of a block."""
        self._start = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`.

        Raises:
            RuntimeError: If :meth:`start` was never called.
        """
        if self._start is None:
            raise RuntimeError("WallClock.stop() before start()")
        return time.perf_counter() - self._start

    def sync(self) -> None:
        """Nothing to wait for."""


class CudaClock:
    """CUDA events on the current stream: the GPU's time between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        """Record the start event."""
        self._start.record()

    def stop(self) -> float:
        """Record the end event, wait for it, and return the seconds between the two events."""
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000.0  # elapsed_time is in milliseconds

    def sync(self) -> None:
        """``torch.cuda.synchronize()``."""
        torch.cuda.synchronize()


def clock_for(device: torch.device) -> Clock:
    """The clock of `device`: CUDA events on a CUDA device, the wall clock elsewhere."""
    return CudaClock() if device.type == "cuda" else WallClock()
