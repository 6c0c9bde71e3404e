"""Benchmarks behind ``kfac-dist bench NAME [options]`` (:data:`BENCHMARKS`; docs/BENCHMARKS.md): one module each.

A benchmark module has ``FULL`` (the help of ``--full``), ``add_arguments(parser)`` (its own options) and
``run(args, log) -> (results, settings)``; its ``NAME_report`` module has ``markdown(results)`` and
``plot(results, out)``. :func:`kfac_dist.app.bench.common.run` gives every benchmark the same skeleton (``--full``,
``--out``, ``--no-plot``, run metadata, output files). Nothing here is imported until a benchmark runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["BENCHMARKS", "add_arguments", "main", "run"]

#: name -> one-line help.
BENCHMARKS: dict[str, str] = {
    "convergence": "steps and wall time to a loss / accuracy target: K-FAC vs SGD-momentum vs Adam",
    "overhead": "per-step time of K-FAC vs SGD in one process, with a phase breakdown",
    "comm": "bytes and memory per rank, ResNet-50 from the planner vs KAISA, checked on gloo",
    "scaling": "gloo runs at W = 1, 2, 4 and a calibrated model of K-FAC/SGD step time to W = 1024",
    "operators": "ATen operators per K-FAC step by kind of step (a GPU's launches, counted on any machine)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command's arguments: a benchmark's name, then its own options (parsed when it runs)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(f"  {name}: {text} (--full: the docs run)" for name, text in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=tuple(BENCHMARKS), metavar="NAME", help="the benchmark (see below)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="its options (kfac-dist bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark of parsed ``bench`` arguments; return the exit code."""
    return main([args.benchmark, *args.options])


def main(argv: Sequence[str] | None = None) -> int:
    """``kfac-dist bench NAME [options]`` without the ``kfac-dist bench`` (argv: NAME and its options)."""
    parser = argparse.ArgumentParser(prog="kfac-dist bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from kfac_dist.app.bench.common import run as run_benchmark

    return run_benchmark(args.benchmark, BENCHMARKS[args.benchmark], args.options)
