"""Numerical fallbacks: counted per kind, logged once per layer and kind, and the decomposition retry ladder.

Most fallbacks are decided on the host and counted at once. ``nonfinite_gradient`` is decided on the device (is a
gradient ``step()`` writes NaN/Inf?) and tallied there with :meth:`Health.tally`, without a host sync; the tally is
read when the counters are (``KFACPreconditioner.health()``, e.g. once per logging interval).
"""

from __future__ import annotations

import logging

import torch

from kfac_dist import curvature
from kfac_dist.methods import ComputeMethod, Decomposition
from kfac_dist.registry import LayerState
from kfac_dist.report import HEALTH_COUNTERS

logger = logging.getLogger("kfac_dist")


class Health:
    """Counters of numerical fallbacks (see ``HEALTH_COUNTERS``)."""

    def __init__(self) -> None:
        self.counters = dict.fromkeys(HEALTH_COUNTERS, 0)
        self._tallies: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    def tally(self, counter: str, flag: torch.Tensor) -> None:
        """Add a 0-d boolean device tensor to `counter` without reading it (see :meth:`totals`)."""
        flag = flag.to(torch.int64)
        previous = self._tallies.get(counter)
        self._tallies[counter] = flag if previous is None else previous + flag

    def totals(self) -> dict[str, int]:
        """Every counter, device tallies included (read here: a device sync on CUDA); logs a tally's first growth."""
        for counter, tally in self._tallies.items():
            grown = int(tally.item())
            self.counters[counter] += grown
            if grown and counter not in self._warned:
                self._warned.add(counter)
                logger.warning("kfac_dist: %s on %d step(s) (further occurrences are only counted)", counter, grown)
        self._tallies.clear()
        return dict(self.counters)

    def count(self, state: LayerState, counter: str, message: str, times: int = 1) -> None:
        """Count a fallback (``times`` occurrences) and log it the first time it happens to this layer."""
        self.counters[counter] += times
        if counter not in state.logged:
            state.logged.add(counter)
            logger.warning("kfac_dist: layer %s: %s (further occurrences are only counted)", state.name, message)

    def count_events(self, state: LayerState, events: dict[str, int]) -> None:
        """Add a decomposition's :attr:`~kfac_dist.methods.Decomposition.events` (counts of blocks)."""
        for counter, blocks in events.items():
            if blocks:
                self.count(state, counter, f"{counter} ({blocks} block(s))", times=blocks)

    def decompose_group(
        self,
        members: list[LayerState],
        previous: Decomposition | None,
        *,
        method: ComputeMethod,
        damping: float,
        dtype: torch.dtype,
    ) -> Decomposition | None:
        """Decompose the members' factors, concatenated along blocks, in one call, retried once in float64.

        Returns None if both fail: the caller then decomposes each member with :meth:`decompose`, whose fallbacks
        are per layer. A float64 retry is counted for every member (each block's result depends on it alone, so
        it equals the member's own float64 retry).
        """
        a = _concatenated([s.a for s in members])
        g = _concatenated([s.g for s in members])
        diagonal = members[0].layer.a_diagonal
        try:
            result = method.decompose(a, g, a_diagonal=diagonal, damping=damping, dtype=dtype, previous=previous)
        except curvature.DecompositionError as error:
            if dtype == torch.float64:
                return None
            try:
                result = method.decompose(a, g, a_diagonal=diagonal, damping=damping, dtype=torch.float64).cast(dtype)
            except curvature.DecompositionError:
                return None
            for state in members:
                self.count(state, "decomposition_retried_float64", f"{error}; retrying in float64")
        self.count_events(members[0], result.events)
        return result

    def decompose(
        self, state: LayerState, *, method: ComputeMethod, damping: float, dtype: torch.dtype
    ) -> Decomposition | None:
        """Decompose the layer's factors in ``dtype``; retry in float64; else keep the previous decomposition."""
        assert state.a is not None and state.g is not None
        dtypes = [dtype] + ([torch.float64] if dtype != torch.float64 else [])
        previous = state.decomposition
        for attempt, attempt_dtype in enumerate(dtypes):
            try:
                result = method.decompose(
                    state.a,
                    state.g,
                    a_diagonal=state.layer.a_diagonal,
                    damping=damping,
                    dtype=attempt_dtype,
                    previous=previous if attempt_dtype == dtype else None,
                )
            except curvature.DecompositionError as error:
                if attempt + 1 < len(dtypes):
                    self.count(state, "decomposition_retried_float64", f"{error}; retrying in float64")
                continue
            self.count_events(state, result.events)
            return result if attempt_dtype == dtype else result.cast(dtype)
        if state.decomposition is not None:
            self.count(state, "decomposition_kept_previous", "decomposition failed; kept the previous one")
        else:
            self.count(state, "decomposition_unavailable", "decomposition failed; gradient left as it is")
        return state.decomposition


def _concatenated(factors: list[torch.Tensor | None]) -> torch.Tensor:
    """Factors concatenated along blocks (the tensor itself when there is one)."""
    present = [f for f in factors if f is not None]
    assert len(present) == len(factors), "every member has factors"
    return present[0] if len(present) == 1 else torch.cat(present)
