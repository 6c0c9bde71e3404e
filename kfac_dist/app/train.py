"""``kfac-dist train --config FILE [key.path=value ...]`` (also ``python -m kfac_dist.app.train``).

Works unchanged as a plain process and under torchrun, srun and mpirun/mpiexec (see :mod:`kfac_dist.app.env`). The
config is read and validated before any process group starts, so a bad config stops every rank at once with one message.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kfac_dist.app.config import Config, ConfigError, format_config, load_config
from kfac_dist.app.env import LaunchEnvError, detect_env, init_distributed, run_identity, shutdown_distributed
from kfac_dist.app.preemption import EXIT_PREEMPTED, StopSignals
from kfac_dist.comm import CollectiveError, RendezvousTimeout
from kfac_dist.comm.backends import resolve_backend

__all__ = ["add_arguments", "main", "parse_arguments", "run"]


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


def _check_output_directories(cfg: Config) -> None:
    """Refuse a ``logging.dir`` or checkpoint directory that a file stands in the way of (itself or a parent).

    Raises:
        ConfigError: Naming the key, the directory and the file.
    """
    for key, directory in (("logging.dir", Path(cfg.logging.dir)), ("checkpoint.dir", cfg.checkpoint_dir())):
        blocker = next((path for path in (directory, *directory.parents) if path.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "is a file" if blocker == directory else f"cannot be created: {blocker} is a file"
            raise ConfigError(tuple(key.split(".")), f"{directory} {where}", "a directory, or a path to create one at")


def _one_line(error: BaseException) -> str:
    """``error``'s message on one line.

    For an error a data-loader worker re-raised (its message holds the worker's traceback): the original's message.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return re.sub(r"^[\w.]+: ", "", lines[-1])  # "OSError: cannot decode image ..." -> "cannot decode image ..."
    return "; ".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``train`` with parsed arguments; returns the exit code: 0, 1 (an error), 2 (a config error) or 75.

    75: stopped by SIGTERM / SIGUSR1 after writing a checkpoint (:mod:`kfac_dist.app.preemption`).

    Every error the user can fix (config, launch environment, files, data, a full disk) is one line on stderr.
    """
    with StopSignals() as stop:  # until the process group is shut down: a stop signal never kills a rank mid-way
        code = _run(args, stop)
        if code == EXIT_PREEMPTED:
            stop.ignore_after_exit()
    return code


def _run(args: argparse.Namespace, stop: StopSignals) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        _check_output_directories(cfg)
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
        if resolve_backend(cfg.comm.backend, torch.cuda.is_available()).torch_distributed and env.world_size > 1:
            run_id = run_identity(format_config(cfg))  # the same on every rank of this run
            init_distributed(env, cfg.comm.backend, cfg.comm.timeout_s, run_id=run_id)
        result = Trainer(cfg, env, stop).run()
    except ConfigError as error:  # found once the data is loaded (model.num_classes) or at checkpoint.resume
        print(f"kfac-dist train: error (rank {env.rank}): {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, CollectiveError, RendezvousTimeout) as error:  # files, data, a full disk, a peer
        # that stopped answering (comm.timeout_s), ...: one line
        print(f"kfac-dist train: error (rank {env.rank}): {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if result.stopped_by is not None:
        if env.rank == 0:
            print(
                f"kfac-dist train: stopped by {result.stopped_by} after step {result.steps}, checkpoint written; "
                f"exit code {EXIT_PREEMPTED} (rerun with checkpoint.resume=auto to continue)",
                file=sys.stderr,
            )
        return EXIT_PREEMPTED
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
