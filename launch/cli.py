"""The ``kfac-dist`` command line.

``kfac-dist train --config FILE [key.path=value ...]`` trains from a YAML config (:mod:`launch.train`); without
``--config`` it runs the embedded default (a small CNN on MNIST-5k with SGD + K-FAC) and ends with a
``final test accuracy: <fraction of the test split, 4 decimals>`` line.

``kfac-dist plan --model resnet50 --world-size 64 ...`` prints what a distributed run would hold and move per rank
(memory by category, bytes per step by category, decomposition load, beside KAISA's scheme) without starting a
process; ``--json`` prints the same as JSON (see :mod:`kfac_dist.planner`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence

from kfac_dist.models import MODEL_NAMES
from kfac_dist.options import COMPUTE_METHODS, FACTOR_COMMS
from kfac_dist.placement import ASSIGNMENTS, STRATEGIES
from kfac_dist.planner import PlanOptions, plan_model
from launch import bench, train

__all__ = ["build_parser", "main", "run_plan"]


def _number(kind: type[int] | type[float], low: float, low_open: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train from a YAML config (default: the embedded MNIST-5k run)")
    train.add_arguments(parser)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (kfac-dist bench convergence [--full])")
    bench.add_arguments(parser)


def _fraction(text: str) -> float | str:
    """A grad-worker fraction: a strategy name or a number in (0, 1]."""
    if text in STRATEGIES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] or one of {', '.join(STRATEGIES)}, got {text!r}")
    return value


def _add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    d = PlanOptions()
    p = subparsers.add_parser(
        "plan",
        help="per-rank memory, bytes per step and decomposition load of a distributed run, without processes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=MODEL_NAMES, required=True, help="model from kfac_dist.models (built on meta)")
    p.add_argument("--world-size", type=_number(int, 1, False), required=True, help="number of ranks W")
    p.add_argument(
        "--grad-worker-fraction",
        type=_fraction,
        default=d.grad_worker_fraction,
        help=f"fraction of ranks preconditioning each layer, in (0, 1], or one of {', '.join(STRATEGIES)}",
    )
    p.add_argument("--assignment", choices=ASSIGNMENTS, default=d.assignment, help="cost that places layers first")
    p.add_argument("--factor-comm", choices=FACTOR_COMMS, default=d.factor_comm, help="factor reduction scheme")
    p.add_argument(
        "--symmetric-comm",
        action=argparse.BooleanOptionalAction,
        default=d.symmetric_comm,
        help="send symmetric matrices as upper triangles",
    )
    p.add_argument("--compute-method", choices=COMPUTE_METHODS, default=d.compute_method, help="decomposition kind")
    p.add_argument("--bucket-cap-mb", type=_number(float, 0, True), default=d.bucket_cap_mb, help="fusion bucket cap")
    p.add_argument(
        "--factor-update-steps", type=_number(int, 1, False), default=d.factor_update_steps, help="factor period"
    )
    p.add_argument(
        "--inv-update-steps", type=_number(int, 1, False), default=d.inv_update_steps, help="decomposition period"
    )
    p.add_argument(
        "--skip-layers",
        action="append",
        default=[],
        metavar="PATTERN",
        help="glob of module names or class names not to precondition (repeatable)",
    )
    p.add_argument(
        "--dtype-bytes",
        type=_number(int, 1, False),
        default=4,
        help="bytes per element of factors, decompositions and gradients (4: float32, 8: float64)",
    )
    for name in ("factor", "inv", "grad"):
        p.add_argument(
            f"--{name}-bytes", type=_number(int, 1, False), default=None, help="override --dtype-bytes for " + name
        )
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--per-rank", action="store_true", help="print a row per rank at any world size")
    p.set_defaults(command="plan")


def run_plan(args: argparse.Namespace) -> int:
    """Run ``kfac-dist plan`` on parsed arguments; print the report and return the exit code."""
    sizes = {f"{n}_bytes": getattr(args, f"{n}_bytes") or args.dtype_bytes for n in ("factor", "inv", "grad")}
    try:
        report = plan_model(
            args.model,
            args.world_size,
            grad_worker_fraction=args.grad_worker_fraction,
            assignment=args.assignment,
            factor_comm=args.factor_comm,
            symmetric_comm=args.symmetric_comm,
            compute_method=args.compute_method,
            bucket_cap_mb=args.bucket_cap_mb,
            factor_update_steps=args.factor_update_steps,
            inv_update_steps=args.inv_update_steps,
            skip_layers=tuple(args.skip_layers),
            **sizes,
        )
    except ValueError as error:
        print(f"kfac-dist plan: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()) if args.json else report.to_text(per_rank=args.per_rank or None))
    return 0


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
        return run_plan(args)
    if args.command == "bench":
        return bench.run(args)
    return train.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
