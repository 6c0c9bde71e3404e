"""The ``kfac-dist`` command line.

``kfac-dist train`` runs the embedded default job (a small CNN on MNIST-5k with SGD + K-FAC) and prints one
line per epoch and a final ``final test accuracy: X.XXXX`` line.

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
from launch.train import OPTIMIZERS, EpochResult, TrainSettings, run_training

__all__ = ["build_parser", "main", "run_plan", "settings_from_args"]


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
    d = TrainSettings()
    p = subparsers.add_parser(
        "train",
        help="train the embedded default: a small CNN on MNIST-5k",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=("small_cnn", "mlp"), default=d.model, help="model from kfac_dist.models")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="SGD with or without K-FAC")
    p.add_argument("--epochs", type=_number(int, 1, False), default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=_number(int, 1, False), default=d.batch_size, help="examples per step")
    p.add_argument("--lr", type=_number(float, 0, True), default=d.lr, help="learning rate")
    p.add_argument("--momentum", type=_number(float, 0, False), default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=_number(float, 0, False), default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--damping", type=_number(float, 0, True), default=d.damping, help="K-FAC damping")
    p.add_argument(
        "--factor-update-steps",
        type=_number(int, 1, False),
        default=d.factor_update_steps,
        help="K-FAC factor period",
    )
    p.add_argument(
        "--inv-update-steps",
        type=_number(int, 1, False),
        default=d.inv_update_steps,
        help="K-FAC inverse period",
    )
    p.add_argument("--kl-clip", type=_number(float, 0, True), default=d.kl_clip, help="K-FAC KL-clip bound")
    p.add_argument("--no-kl-clip", action="store_true", help="disable KL-clip")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data split, initialisation and shuffles")
    p.set_defaults(command="train")


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
    return parser


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Turn parsed ``train`` arguments into :class:`~launch.train.TrainSettings`."""
    return TrainSettings(
        model=args.model,
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        damping=args.damping,
        factor_update_steps=args.factor_update_steps,
        inv_update_steps=args.inv_update_steps,
        kl_clip=None if args.no_kl_clip else args.kl_clip,
        seed=args.seed,
    )


def _print_epoch(result: EpochResult) -> None:
    print(
        f"epoch {result.epoch}: train loss {result.train_loss:.4f}, test accuracy {result.test_accuracy:.4f} "
        f"({result.seconds:.1f} s)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kfac-dist`` console script.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return run_plan(args)
    if args.command == "train":
        settings = settings_from_args(args)
        print(f"kfac-dist train: {settings}", flush=True)
        results = run_training(settings, on_epoch=_print_epoch)
        print(f"final test accuracy: {results[-1].test_accuracy:.4f}", flush=True)
        if not math.isfinite(results[-1].train_loss):
            print("kfac-dist train: the training loss is not finite (the run diverged)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
