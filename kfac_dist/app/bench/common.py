"""What every benchmark's command line shares: an argument type, the machine line, run metadata, output files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchRun", "machine", "md_header", "md_row", "positive_int", "write_outputs"]

Markdown = Callable[[dict[str, Any]], str]
Plot = Callable[[dict[str, Any], Path], "Path | list[Path]"]


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def md_row(cells: Sequence[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def md_header(cells: Sequence[str]) -> list[str]:
    """A Markdown table's header row and separator."""
    return [md_row(cells), "|" + "---|" * len(cells)]


def machine() -> str:
    """A one-line description of this machine (CPU model, core count, OS)."""
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


class BenchRun:
    """Started when a benchmark starts; :meth:`meta` describes the finished run (stored as ``results["meta"]``)."""

    def __init__(self, command: str, threads: int) -> None:
        self.command = command
        self.threads = threads
        self.load_before = os.getloadavg()
        self.started = time.perf_counter()

    def meta(self, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Date, machine, threads, torch, command, wall time, load averages before / after (and the settings)."""
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "machine": machine(),
            "threads": self.threads,
            "torch": torch.__version__,
            "command": self.command,
            "wall_seconds": time.perf_counter() - self.started,
            "load_average_before_after": [list(self.load_before), list(os.getloadavg())],
        }
        return meta if settings is None else meta | {"settings": settings}


def write_outputs(out: Path, results: dict[str, Any], markdown: Markdown, plot: Plot | None) -> list[Path]:
    """Write ``out``.json and ``out``.md (and the plot unless `plot` is None); print and return the paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(markdown(results))
    if plot is not None:
        made = plot(results, out)
        written += made if isinstance(made, list) else [made]
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return written
