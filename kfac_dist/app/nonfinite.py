"""The non-finite policy (``training.nonfinite``): what training does when the loss or the gradients turn NaN/Inf.

Detection adds no per-step host sync with ``stop`` (the default):

- every step adds one flag to a tally on the device: its loss (summed over its micro-batches) is not finite, or,
  with ``training.grad_clip``, the gradient norm that clipping computes anyway is not finite;
- K-FAC counts the steps whose preconditioned gradients are not finite (``pre.health()["nonfinite_gradient"]``,
  also tallied on the device);
- both are read, summed over ranks (a one-element all-reduce, so every rank decides alike), where the trainer
  reads its metrics anyway: at each logging interval, at the end of an epoch, and before every checkpoint.

Without grad_clip and K-FAC a NaN gradient is seen one step later, in the loss of the NaN weights it produced, or by
the check of the weights before a checkpoint is written.

``stop``: the check raises :class:`NonFiniteError` naming the steps since the last clean check and the last
checkpoint; nothing is written after the first non-finite step (the weights those steps changed live only in
memory and are dropped). The run exits with code 1.

``skip``: each step is checked before the optimizer applies it, which costs a host read and a one-element
all-reduce per step (the price of knowing about *that* step in time). A non-finite step is not applied: no
optimizer update (momentum and Adam moments unchanged), its loss is left out of the metrics, its gradients are
dropped; the data it saw, the lr schedule and K-FAC's step counter move on (K-FAC already skips non-finite factors).
More than ``training.nonfinite_max_skips`` non-finite steps in a row stop the run as with ``stop``.

With ``training.amp=fp16`` the gradient scaler already skips steps whose gradients overflow (and lowers its scale),
so the policy watches the loss only.

Whatever the policy, every rank checks the state (weights, optimizer and K-FAC state) before a checkpoint is written
and refuses to write a non-finite one, so the newest checkpoint, which pruning never removes, is always finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kfac_dist.app import run_report
from kfac_dist.app.checkpoint import first_nonfinite
from kfac_dist.app.config.schema import NONFINITE_POLICIES
from kfac_dist.comm import Communicator

__all__ = ["NonFiniteError", "NonFiniteGuard"]

ADVICE = "lower optimizer.lr or set training.grad_clip"


class NonFiniteError(ValueError):
    """Training stopped because the loss, the gradients or the state to checkpoint were not finite."""


class NonFiniteGuard:
    """Applies ``training.nonfinite`` on one rank; every rank makes the same calls at the same steps.

    Args:
        policy: ``stop`` or ``skip``.
        max_skips: ``training.nonfinite_max_skips``: with ``skip``, the most non-finite steps in a row skipped.
        comm: The run's communicator (flags are summed over ranks).
        device: Where the tally lives (the training device).
        watch_gradients: Whether gradient norms and K-FAC's counter count (False with a gradient scaler).
        kfac_count: K-FAC's ``nonfinite_gradient`` counter so far (0 without K-FAC); a host read.
        last_checkpoint: The newest checkpoint on disk, for messages.
        announce: Prints a line on rank 0 (a no-op elsewhere).
    """

    def __init__(
        self,
        *,
        policy: str,
        max_skips: int,
        comm: Communicator,
        device: torch.device,
        watch_gradients: bool,
        kfac_count: Callable[[], int],
        last_checkpoint: Callable[[], Path | None],
        announce: Callable[[str], None],
    ) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"training.nonfinite: {policy!r} is not one of {NONFINITE_POLICIES}")
        self.policy, self.max_skips, self.comm, self.device = policy, max_skips, comm, device
        self.watch_gradients = watch_gradients
        self._kfac_count, self._last_checkpoint, self._announce = kfac_count, last_checkpoint, announce
        self._tally = torch.zeros((), dtype=torch.float64, device=device)
        self._kfac_seen = 0
        self._checked_through = 0
        self._in_a_row = 0

    @property
    def skipping(self) -> bool:
        """Whether each step is checked before it is applied (``skip``)."""
        return self.policy == "skip"

    def rebase(self, global_step: int) -> None:
        """Start watching at `global_step` (after a resume: steps and K-FAC counts up to here are not this run's)."""
        self._kfac_seen = self._kfac_count() if self.watch_gradients else 0
        self._checked_through = global_step
        self._tally.zero_()

    def admit(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, global_step: int) -> bool:
        """Whether to apply step `global_step` (1-based), whose loss sum and gradient norm (if known) are given.

        ``stop``: adds the step's flag to the device tally and returns True without a host sync. ``skip``: decides
        now (a host read and a one-element all-reduce); raises :class:`NonFiniteError` after too many in a row.
        """
        bad = ~torch.isfinite(loss_sum)
        if grad_norm is not None and self.watch_gradients:
            bad = bad | ~torch.isfinite(grad_norm)
        if not self.skipping:
            self._tally += bad
            return True
        flag = (bad.to(torch.float64) + self._kfac_delta()).reshape(1)
        self.comm.allreduce(flag, average=False, category=run_report.METRICS).wait()
        if run_report.host_values(flag)[0] == 0:
            self._in_a_row = 0
            return True
        self._in_a_row += 1
        if self._in_a_row > self.max_skips:
            first = global_step - self._in_a_row + 1
            raise NonFiniteError(
                f"training.nonfinite=skip: the loss or the gradients were not finite in {self._in_a_row} steps in a "
                f"row ({first}-{global_step}), more than training.nonfinite_max_skips={self.max_skips}; "
                f"{self._where()}; {ADVICE}"
            )
        self._announce(
            f"step {global_step}: non-finite loss or gradients, update skipped ({self._in_a_row} in a row, "
            f"training.nonfinite_max_skips={self.max_skips})"
        )
        return False

    def check(self, global_step: int) -> None:
        """``stop``: raise :class:`NonFiniteError` if a step since the last check was not finite on any rank.

        Collective (a one-element all-reduce) and a host read; call it where the metrics are read anyway.
        """
        if self.skipping:
            return
        flag = (self._tally + self._kfac_delta()).reshape(1)
        self.comm.allreduce(flag, average=False, category=run_report.METRICS).wait()
        seen = run_report.host_values(flag)[0] != 0
        first, self._checked_through = self._checked_through + 1, global_step
        self._tally.zero_()
        if seen:
            raise NonFiniteError(
                f"training.nonfinite=stop: the loss or the gradients were not finite in step(s) {first}-{global_step}; "
                f"{self._where()}; {ADVICE}, or use training.nonfinite=skip"
            )

    def check_state(self, state: Mapping[str, Any], global_step: int) -> None:
        """Before a checkpoint (collective): raise :class:`NonFiniteError` if `state` is not finite on any rank."""
        where = first_nonfinite(state)
        flag = torch.tensor([0.0 if where is None else 1.0], dtype=torch.float64, device=self.device)
        self.comm.allreduce(flag, average=False, category=run_report.METRICS).wait()
        if run_report.host_values(flag)[0] != 0:
            what = f"state{where} is" if where is not None else "the state is, on another rank,"
            raise NonFiniteError(
                f"refusing to write the checkpoint of step {global_step}: {what} not finite; {self._where()}; {ADVICE}"
            )

    def _kfac_delta(self) -> float:
        if not self.watch_gradients:
            return 0.0
        count = self._kfac_count()
        delta, self._kfac_seen = count - self._kfac_seen, count
        return float(delta)

    def _where(self) -> str:
        last = self._last_checkpoint()
        if last is None:
            return "stopped before any checkpoint was written"
        return f"stopped without writing a checkpoint (the last one, {last}, is kept)"
