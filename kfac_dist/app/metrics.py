"""Per-epoch metrics of a run: one CSV row per epoch and TensorBoard scalars, written by rank 0 only.

``metrics.csv`` describes the run its directory holds: opening it keeps the rows up to the step the run starts from
(the resumed checkpoint's; 0 for a fresh run) and drops the rest, so neither a resume from an older checkpoint nor a
rerun in the same directory repeats rows. Dropping rewrites the file atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

#: Columns of metrics.csv, in order; a missing value is written as an empty cell.
COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "damping",
    "epoch_seconds",
    "step_seconds",
    "kfac_step_seconds",
    "bytes_sent",
    "bytes_received",
)


class MetricsLogger:
    """Writes ``metrics.csv`` and TensorBoard event files under ``run_dir``.

    Args:
        run_dir: the run directory.
        csv_enabled: write metrics.csv.
        tensorboard: write TensorBoard scalars under ``run_dir/tensorboard``.
        enabled: False on every rank but 0: nothing is written.
        keep_through_step: the global step the run starts from: rows of an existing metrics.csv with a larger
            ``step`` are dropped (0: a fresh run keeps none), and the rest are kept, then appended to.
    """

    def __init__(
        self, run_dir: Path, *, csv_enabled: bool, tensorboard: bool, enabled: bool, keep_through_step: int = 0
    ) -> None:
        self.path = run_dir / "metrics.csv"
        self._csv = csv_enabled and enabled
        self._writer: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self._csv:
            _keep_rows_through(self.path, keep_through_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is heavy

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_epoch(self, values: Mapping[str, float | int | None]) -> None:
        """Append one epoch's metrics (unknown keys are an error, so columns never drift)."""
        unknown = sorted(set(values) - set(COLUMNS))
        if unknown:
            raise KeyError(f"unknown metric columns {unknown}; known: {COLUMNS}")
        if self._csv:
            with self.path.open("a", newline="") as handle:
                csv.writer(handle).writerow([_cell(values.get(column)) for column in COLUMNS])
        if self._writer is not None:
            step = int(values.get("step") or 0)
            for key, value in values.items():
                if key not in ("epoch", "step") and value is not None and math.isfinite(float(value)):
                    self._writer.add_scalar(key, float(value), global_step=step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        """Use as a context manager."""
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Close on exit."""
        self.close()


def _cell(value: float | int | None) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _step_of(row: Mapping[str, str | None]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return math.nan


def _keep_rows_through(path: Path, step: int) -> None:
    """Make ``path`` a metrics.csv with the current header and only the rows of steps <= ``step``, atomically."""
    rows: list[dict[str, str | None]] = []
    header: list[str] | None = None
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    kept = [row for row in rows if _step_of(row) <= step]  # a row without a readable step is dropped too
    if header == list(COLUMNS) and len(kept) == len(rows):
        return  # nothing to drop: appending continues the file as it is
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
