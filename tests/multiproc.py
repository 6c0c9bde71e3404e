"""The tests' multi-process harness: :func:`kfac_dist.app.processes.run_gloo` with test-sized time limits.

    results = run_multiproc(fn, world_size, *args)

A failed run raises `MultiprocFailure`, an AssertionError, so pytest prints the harness's report (every failed
rank's traceback or output tail, the rank that failed first) as the test's failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kfac_dist.app.processes import GlooRunError, run_gloo


class MultiprocFailure(AssertionError):
    """A multi-process run failed: a child failed, died or timed out."""


def run_multiproc(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 20.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in `world_size` gloo processes (1 thread each); results by rank.

    `timeout` bounds the whole run (start-up included); `pg_timeout` is the collective timeout of the group.
    """
    try:
        return run_gloo(fn, world_size, *args, timeout=timeout, pg_timeout=pg_timeout)
    except GlooRunError as failure:
        raise MultiprocFailure(str(failure)) from None
