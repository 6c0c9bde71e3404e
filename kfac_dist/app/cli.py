"""The ``kfac-dist`` command line.

``kfac-dist train --config FILE [key.path=value ...]`` trains from a YAML config (:mod:`kfac_dist.app.train`); without
``--config`` it runs the embedded default (a small CNN on MNIST-5k with SGD + K-FAC) and ends with a
``final test accuracy: <fraction of the test split, 4 decimals>`` line.

``kfac-dist plan --model resnet50 --world-size 64 ...`` or ``kfac-dist plan --config FILE [key.path=value ...]``
prints what a distributed run would hold and move per rank (memory by category, bytes per step by category,
decomposition load, beside KAISA's scheme) without starting a process; ``--json`` prints the same as JSON
(:mod:`kfac_dist.app.plan`, :mod:`kfac_dist.planner`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kfac_dist.app import bench, plan, train

__all__ = ["build_parser", "main"]


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train from a YAML config (default: the embedded MNIST-5k run)")
    train.add_arguments(parser)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (kfac-dist bench convergence [--full])")
    bench.add_arguments(parser)


def _add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="per-rank memory, bytes per step and decomposition load of a distributed run, without processes"
    )
    plan.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``kfac-dist`` argument parser (one subcommand per job)."""
    parser = argparse.ArgumentParser(prog="kfac-dist", description="Distributed K-FAC training for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(subparsers)
    _add_plan_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kfac-dist`` console script.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args = train.parse_arguments(build_parser(), argv)
    if args.command == "plan":
        return plan.run(args)
    if args.command == "bench":
        return bench.run(args)
    return train.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
