"""Benchmarks behind ``kfac-dist bench NAME``; each is a module with ``add_arguments(parser)`` and ``run(args)``.

- ``convergence`` (:mod:`kfac_dist.app.bench.convergence`): steps and wall time to a training-loss and a test-accuracy
  target, SGD-momentum + K-FAC vs SGD-momentum vs Adam, each tuned on a grid.
- ``overhead`` (:mod:`kfac_dist.app.bench.overhead`): per-step time of K-FAC vs SGD in one process, with a phase
  breakdown.
- ``comm`` (:mod:`kfac_dist.app.bench.comm`): bytes and K-FAC memory per rank from the planner (ResNet-50, ours vs
  KAISA), checked against real gloo runs.
- ``scaling`` (:mod:`kfac_dist.app.bench.scaling`): real gloo runs at small W and a calibrated latency-bandwidth model
  that predicts K-FAC and SGD step times to W = 1024.

New benchmarks register in :data:`BENCHMARKS`; :func:`add_arguments` gives each a sub-command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from kfac_dist.app.bench import comm, convergence, overhead, scaling

__all__ = ["BENCHMARKS", "add_arguments", "run"]

#: name -> (help, add_arguments, run)
BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "convergence": (
        "steps and wall time to a loss / accuracy target: K-FAC vs SGD-momentum vs Adam (--full: the docs run)",
        convergence.add_arguments,
        convergence.run,
    ),
    "overhead": (
        "per-step time of K-FAC vs SGD in one process, with a phase breakdown (--full: the docs run)",
        overhead.add_arguments,
        overhead.run,
    ),
    "comm": (
        "bytes and memory per rank, ResNet-50 from the planner vs KAISA, checked on gloo (--full: the docs run)",
        comm.add_arguments,
        comm.run,
    ),
    "scaling": (
        "gloo runs at W = 1, 2, 4 and a calibrated model of K-FAC/SGD step time to W = 1024 (--full: the docs run)",
        scaling.add_arguments,
        scaling.run,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` (the ``bench`` sub-command's) one sub-command per benchmark."""
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (help_text, add, _) in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named by ``args.benchmark``; return the exit code."""
    return BENCHMARKS[args.benchmark][2](args)
