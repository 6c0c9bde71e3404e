"""Opt-in wall-clock accounting of K-FAC's phases (``KFACPreconditioner(profile=True)``).

Phases: ``factor_computation`` (a a^T and g g^T in the hooks), ``factor_communication`` (finishing the fused
factor reduction in ``step()``; the part overlapped with backward is not seen here), ``factor_update`` (running
averages), ``decomposition``, ``decomposition_broadcast``, ``preconditioning``, ``gradient_broadcast`` and
``kl_clip`` (KL-clip and writing ``.grad``). On CUDA every phase boundary synchronises the device, so profiling
changes the overlap it measures; leave it off for production runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = (
    "factor_computation",
    "factor_communication",
    "factor_update",
    "decomposition",
    "decomposition_broadcast",
    "preconditioning",
    "gradient_broadcast",
    "kl_clip",
)


class PhaseTimer:
    """Sums of seconds per phase; a no-op when disabled."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self._sync = enabled and device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``name``."""
        if not self.enabled:
            yield
            return
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        """Zero every phase."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
