"""``kfac-dist train --config FILE [key.path=value ...]`` (also ``python -m kfac_dist.app.train``).

Works unchanged as a plain process and under torchrun, srun and mpirun/mpiexec (see :mod:`kfac_dist.app.env`). The
config is read and validated before any process group starts, so a bad config stops every rank at once with one message.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from kfac_dist.app.config import ConfigError, format_config, load_config
from kfac_dist.app.env import LaunchEnvError, detect_env, init_distributed, shutdown_distributed

__all__ = ["add_arguments", "main", "parse_arguments", "run"]

TORCH_BACKENDS = ("auto", "nccl", "gloo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` arguments."""
    parser.add_argument("--config", help="YAML run config (default: the embedded MNIST-5k run, configs/mnist_cnn.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv` with `parser`, taking ``key.path=value`` overrides wherever they stand.

    argparse takes a ``nargs="*"`` positional only in one run, so ``--config F a=1 --print-config b=2`` would
    leave ``b=2`` unrecognised; overrides after a flag are appended in order instead. Anything else unknown is
    the usual usage error (exit code 2).
    """
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):  # train and plan take overrides
        late = [word for word in extra if "=" in word and not word.startswith("-")]
        if len(late) == len(extra):
            args.overrides = [*args.overrides, *late]
            return args
    if extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    return args


def run(args: argparse.Namespace) -> int:
    """Run ``train`` with parsed arguments; returns the exit code."""
    try:
        cfg = load_config(args.config, args.overrides)
        env = detect_env()
    except (ConfigError, LaunchEnvError) as error:
        print(f"kfac-dist train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        if env.rank == 0:
            print(format_config(cfg), end="")
        return 0
    from kfac_dist.app.trainer import Trainer  # imported after validation: a bad config fails fast

    try:
        if cfg.comm.backend in TORCH_BACKENDS and env.world_size > 1:
            init_distributed(env, cfg.comm.backend, cfg.comm.timeout_s)
        result = Trainer(cfg, env).run()
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"kfac-dist train: error (rank {env.rank}): {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if env.rank == 0:
        print(f"final test accuracy: {result.val_top1:.4f}", flush=True)
        print(f"wall time: {result.seconds:.1f} s", flush=True)
    if result.history and not math.isfinite(result.train_loss):
        print("kfac-dist train: the training loss is not finite (the run diverged)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kfac_dist.app.train``."""
    parser = argparse.ArgumentParser(prog="kfac-dist train", description=__doc__)
    add_arguments(parser)
    return run(parse_arguments(parser, argv))


if __name__ == "__main__":
    raise SystemExit(main())
