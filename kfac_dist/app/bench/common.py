"""What every benchmark shares: the command-line skeleton, run metadata, output files, the way to name a model."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kfac_dist.app.models import build_model

__all__ = [
    "PROXY",
    "BenchRun",
    "Log",
    "ModelSpec",
    "command_line",
    "machine",
    "load_text",
    "md_header",
    "md_row",
    "md_table",
    "positive_int",
    "run",
    "write_outputs",
]

Log = Callable[[str], None]
Markdown = Callable[[dict[str, Any]], str]
Plot = Callable[[dict[str, Any], Path], "Path | list[Path]"]


@dataclass(frozen=True)
class ModelSpec:
    """A model of the benchmarks: ``build_model(builder, **kwargs)`` on inputs of ``input_shape``."""

    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (3, 32, 32)

    @property
    def num_classes(self) -> int:
        """Classes of the output layer."""
        return int(self.kwargs.get("num_classes", 1000))

    def build(self, seed: int | None = 0) -> nn.Module:
        """The model, weights from `seed` (None: from the current torch seed)."""
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(self.builder, **self.kwargs)

    def build_meta(self) -> nn.Module:
        """The model on the meta device (shapes only, nothing allocated)."""
        with torch.device("meta"):
            return build_model(self.builder, **self.kwargs)

    def batch(self, size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A synthetic batch of `size` inputs and labels."""
        x = torch.randn(size, *self.input_shape, generator=generator)
        return x, torch.randint(0, self.num_classes, (size,), generator=generator)

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"builder": self.builder, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}


#: The real-run model: ResNet-50's 54 preconditioned layers at 1/8 width (125 classes, so the fc layer scales like the
#: rest) on 32x32 inputs; the same layer structure as ResNet-50, small enough for several gloo processes on 2 cores.
PROXY = ModelSpec("resnet50", {"width_multiplier": 0.125, "num_classes": 125}, (3, 32, 32))


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


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: header, separator and one line per row."""
    return [*md_header(head), *map(md_row, rows)]


def load_text(pairs: Sequence[Sequence[float]]) -> str:
    """Load averages before / after as ``"1.0, 0.9, 0.8 / 1.2, 1.0, 0.9"``."""
    return " / ".join(", ".join(f"{x:.1f}" for x in triple) for triple in pairs)


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

    def __init__(self, command: str, threads: int = 1) -> None:
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


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> str:
    """The ``kfac-dist`` command that reproduces a run (options at their defaults left out)."""
    words = ["kfac-dist", "bench", name] + (["--full"] if args.full else [])
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "full", "out", "no_plot") or value is None or value == action.default:
            continue
        values = value if isinstance(value, list) else [value]
        words += [
            action.option_strings[0],
            *(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values),
        ]
    return shlex.join([*words, "--out", str(args.out)] + (["--no-plot"] if args.no_plot else []))


def run(name: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse the options of benchmark `name`, run it, write ``--out``.json, .md (and .png unless ``--no-plot``).

    Returns:
        The exit code: the benchmark's ``exit_code(results)`` if it has one, else 0.
    """
    module = importlib.import_module(f"kfac_dist.app.bench.{name}")
    report = importlib.import_module(f"kfac_dist.app.bench.{name}_report")
    parser = argparse.ArgumentParser(prog=f"kfac-dist bench {name}", description=description)
    parser.add_argument("--full", action="store_true", help=module.FULL)
    module.add_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(f"runs/bench/{name}"), help="output path prefix")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib not needed)")
    args = parser.parse_args(argv)
    record = BenchRun(command_line(parser, args, name))
    results, settings = module.run(args, lambda line: print(line, flush=True))
    results["meta"] = record.meta(settings)
    write_outputs(args.out, results, report.markdown, None if args.no_plot else report.plot)
    return int(getattr(module, "exit_code", lambda _: 0)(results))
