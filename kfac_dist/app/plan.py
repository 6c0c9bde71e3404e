"""``kfac-dist plan``: what a distributed run will hold and move per rank, without starting a process.

The options come from three places, the first that has a value winning: an explicit flag, the run config given
with ``--config FILE [key.path=value ...]`` (the same ``KFACPreconditioner`` arguments a training run builds,
:func:`kfac_dist.app.components.preconditioner_options`, and the same model arguments,
:func:`kfac_dist.app.components.model_arguments`), and the preconditioner's defaults. The world size is
``--world-size``, else the launcher's (``WORLD_SIZE`` under torchrun, the step's tasks under ``srun``, ...), else
``SLURM_NTASKS`` (an ``sbatch`` script's shell). ``--model`` is a name of :data:`kfac_dist.app.models.MODEL_NAMES` or a
user's ``module:function`` (the module is imported from the current directory or ``sys.path``; the function is
called with no arguments, or with ``num_classes`` when it takes one and a value is known) that returns an
``nn.Module``. Models are built on the meta device: nothing is allocated. The plan depends only on the layers'
parameter shapes, so the batch size and the input shape change nothing; ``--input-shape`` (or the module's
``INPUT_SHAPE``) runs one forward pass on the meta device, which lazy layers (``nn.LazyLinear``, ...) need to get
their shapes and which checks that the model takes that input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kfac_dist.app.components import model_arguments, preconditioner_options
from kfac_dist.app.config import SCHEDULED_KFAC_OPTIONS, Config, ConfigError, load_config
from kfac_dist.app.env import LaunchEnvError, detect_env
from kfac_dist.app.models import MODEL_NAMES, build_model
from kfac_dist.app.plan_text import plan_text
from kfac_dist.costs import ElementBytes
from kfac_dist.options import OPTION_FIELDS, KFACOptions, Range, check_value
from kfac_dist.planner import plan_model

__all__ = ["PlanError", "add_arguments", "build_planned_model", "build_user_model", "run"]

#: Name of a module-level tuple giving a user's model its per-example input shape (no batch dimension).
INPUT_SHAPE_ATTRIBUTE = "INPUT_SHAPE"
#: The options that change the plan, each a flag (``--grad-worker-fraction``, ...).
PLANNED_FIELDS = tuple(item for item in OPTION_FIELDS.values() if item.metadata["plans"])
#: Examples in the meta forward pass (2, so that batch normalisation in training mode accepts it).
_META_BATCH = 2


class PlanError(ValueError):
    """A bad ``kfac-dist plan`` input; the message names the option, file or module."""


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


def _in_range_or_named(allowed: Range, names: tuple[str, ...]) -> Callable[[str], float | str]:
    """An option that is a number in ``allowed`` or one of ``names`` (``grad_worker_fraction``)."""

    def parse(text: str) -> float | str:
        if text in names:
            return text
        try:
            return check_value("", float(text), allowed)
        except ValueError:
            problem = f"must be {allowed.describe()} or one of {', '.join(names)}, got {text!r}"
            raise argparse.ArgumentTypeError(problem) from None

    return parse


def _add_option_flag(parser: argparse.ArgumentParser, item: dataclasses.Field[Any]) -> None:
    """A flag for one :class:`KFACOptions` field, from its type, range, choices, doc and default."""
    meta, flag = item.metadata, "--" + item.name.replace("_", "-")
    allowed, choices = meta["range"], meta["choices"]
    doc = meta["doc"].replace("%", "%%")  # argparse formats help strings with %
    help_text = f"{doc} (default: the config's, else {item.default!r})"
    if isinstance(item.default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif isinstance(item.default, tuple):
        parser.add_argument(flag, action="append", metavar="PATTERN", help=help_text + "; repeatable")
    elif allowed is not None and choices:
        parser.add_argument(flag, type=_in_range_or_named(allowed, choices), help=help_text)
    elif allowed is not None:
        parser.add_argument(
            flag, type=_number(int if allowed.integer else float, allowed.low, allowed.low_open), help=help_text
        )
    else:
        parser.add_argument(flag, choices=choices, help=help_text)


def _shape(text: str) -> tuple[int, ...]:
    """A per-example input shape: comma-separated integers >= 1, e.g. ``3,224,224``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 such as 3,224,224, got {text!r}")
    return shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` arguments: one flag per :class:`KFACOptions` field that changes the plan (generated from it).

    Options left out come from ``--config``, else the defaults.
    """
    default = "default: the config's, else {}".format
    parser.add_argument(
        "--config", metavar="FILE", help="training YAML whose model, K-FAC schedule and options to plan"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")
    parser.add_argument(
        "--model",
        help=f"one of {', '.join(MODEL_NAMES)}, or module:function returning an nn.Module ({default('required')})",
    )
    parser.add_argument(
        "--num-classes",
        type=_number(int, 1, False),
        help="classes of the model's output layer (" + default("the model's own") + ")",
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help=f"per-example input shape for one forward pass on the meta device (needed by lazy layers only; "
        f"default: the model module's {INPUT_SHAPE_ATTRIBUTE}, else none)",
    )
    parser.add_argument(
        "--world-size",
        type=_number(int, 1, False),
        help="number of ranks W (default: the launcher's, e.g. WORLD_SIZE, else SLURM_NTASKS; required otherwise)",
    )
    for item in PLANNED_FIELDS:
        _add_option_flag(parser, item)
    parser.add_argument(
        "--dtype-bytes",
        type=_number(int, 1, False),
        help="bytes per element of factors, decompositions and gradients (4: float32, 8: float64; "
        "default: from factor_dtype and inv_dtype)",
    )
    for name in ("factor", "inv", "grad"):
        parser.add_argument(f"--{name}-bytes", type=_number(int, 1, False), help="override --dtype-bytes for " + name)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--per-rank", action="store_true", help="print a row per rank at any world size")


@dataclass(frozen=True)
class _Inputs:
    """What the plan is made of, after flags, config and environment are merged."""

    model: str
    model_kwargs: dict[str, Any]
    world_size: int
    options: KFACOptions
    sizes: ElementBytes
    notes: list[str]


def run(args: argparse.Namespace) -> int:
    """Run ``kfac-dist plan`` on parsed arguments; print the report and return the exit code."""
    try:
        inputs = _resolve(args)
        model = build_planned_model(inputs.model, inputs.model_kwargs, args.input_shape)
        report = plan_model(model, inputs.world_size, inputs.options, sizes=inputs.sizes, name=inputs.model)
    except (ConfigError, LaunchEnvError, ValueError) as error:  # PlanError is a ValueError
        print(f"kfac-dist plan: error: {error}", file=sys.stderr)
        return 2
    for note in inputs.notes:
        print(f"kfac-dist plan: note: {note}", file=sys.stderr)
    print(json.dumps(report.to_dict()) if args.json else plan_text(report, per_rank=args.per_rank or None))
    return 0


def _resolve(args: argparse.Namespace) -> _Inputs:
    """Merge the flags over the config over the defaults."""
    notes: list[str] = []
    options = KFACOptions()
    model_kwargs: dict[str, Any] = {}
    model = args.model
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        if not cfg.kfac.enabled:
            notes.append(f"{args.config} sets kfac.enabled=false; planned with its kfac section as if enabled")
        options = preconditioner_options(cfg, steps_per_epoch=1).at_step(0)
        notes += _schedule_notes(cfg)
        model_kwargs = model_arguments(cfg, None)
        if model is None or model == cfg.model.name:
            model = cfg.model.name
        else:  # another model: only the data set's number of classes still applies
            model_kwargs = {k: v for k, v in model_kwargs.items() if k == "num_classes"}
    elif args.overrides:
        raise PlanError(f"key.path=value overrides need --config; got {' '.join(args.overrides)}")
    if model is None:
        raise PlanError("--model is required (a model name or module:function) unless --config names the model")
    flags = {item.name: getattr(args, item.name) for item in PLANNED_FIELDS if getattr(args, item.name) is not None}
    options = replace(options, **flags)
    default_sizes = ElementBytes.of(options)
    sizes = ElementBytes(
        **{
            key: getattr(args, f"{key}_bytes") or args.dtype_bytes or getattr(default_sizes, key)
            for key in ("factor", "inv", "grad")
        }
    )
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    return _Inputs(model, model_kwargs, _world_size(args.world_size, os.environ, notes), options, sizes, notes)


def _schedule_notes(cfg: Config) -> list[str]:
    """A note for each scheduled K-FAC option the plan depends on: it is planned with its value at step 0."""
    notes = []
    for name in SCHEDULED_KFAC_OPTIONS:
        schedule = cfg.kfac.schedule(name)
        if schedule is not None and OPTION_FIELDS[name].metadata["plans"]:
            pairs = zip(schedule.milestones, schedule.values, strict=True)
            later = ", ".join(f"{value:g} from epoch {milestone}" for milestone, value in pairs)
            notes.append(
                f"kfac.{name} has a schedule ({later}); planned with its value at step 0, "
                f"{getattr(cfg.kfac, name)}; pass --{name.replace('_', '-')} to plan a later phase"
            )
    return notes


def _world_size(flag: int | None, environ: Mapping[str, str], notes: list[str]) -> int:
    """``--world-size``, else the launcher's world size, else ``SLURM_NTASKS``."""
    if flag is not None:
        return flag
    env = detect_env(environ)
    if env.launcher != "single":
        notes.append(f"world size {env.world_size} from the {env.launcher} launcher's environment")
        return env.world_size
    tasks = environ.get("SLURM_NTASKS")
    if tasks is not None:
        if not tasks.isdigit() or int(tasks) < 1:
            raise PlanError(f"SLURM_NTASKS must be an integer >= 1 (or pass --world-size); got {tasks!r}")
        notes.append(f"world size {tasks} from SLURM_NTASKS")
        return int(tasks)
    raise PlanError("--world-size is required (no launcher variable such as WORLD_SIZE or SLURM_NTASKS is set)")


def build_planned_model(spec: str, kwargs: Mapping[str, Any], input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The model `spec` names, built on the meta device; a forward pass there when an input shape is known.

    Args:
        spec: a name of :data:`kfac_dist.app.models.MODEL_NAMES`, or ``module:function`` (:func:`build_user_model`).
        kwargs: the model's keyword arguments (``num_classes``, ``width_multiplier``).
        input_shape: per-example input shape (default: a user module's ``INPUT_SHAPE``, else no forward pass).

    Raises:
        PlanError: naming ``--model``, ``--input-shape`` or the module, for any problem.
    """
    if spec in MODEL_NAMES:
        try:
            with torch.device("meta"):
                model = build_model(spec, **kwargs)
        except TypeError as error:
            raise PlanError(f"--model {spec}: {error}") from None
    elif ":" in spec:
        model, module_shape = build_user_model(spec, kwargs.get("num_classes"))
        input_shape = input_shape or module_shape
    else:
        raise PlanError(f"--model must be one of {', '.join(MODEL_NAMES)} or module:function; got {spec!r}")
    if input_shape is not None:
        try:
            with torch.device("meta"), torch.no_grad():
                model(torch.empty(_META_BATCH, *input_shape))
        except Exception as error:  # the user's forward may raise anything
            raise PlanError(
                f"--input-shape {','.join(map(str, input_shape))}: the forward pass of {spec} on the meta device "
                f"failed: {_one_line(error)}"
            ) from None
    elif any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise PlanError(
            f"--input-shape is required: {spec} has lazy layers whose shapes a forward pass sets "
            f"(or give its module an {INPUT_SHAPE_ATTRIBUTE} tuple)"
        )
    return model


def build_user_model(spec: str, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Import ``module:function``, call the function on the meta device, and return its model and input shape.

    The module is imported from the current directory or ``sys.path``; ``function`` may be a dotted attribute
    path. It is called with ``num_classes`` when that is given (it must then take the argument), else with no
    arguments, and must return an ``nn.Module``. The input shape is the module's ``INPUT_SHAPE``, if it has one.

    Raises:
        PlanError: naming ``--model`` and what went wrong (module not found, no such function, not an nn.Module).
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PlanError(f"--model {spec!r}: expected module:function, e.g. mymodels:build_net")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()
        module = importlib.import_module(module_name)
    except Exception as error:  # importing the user's module may raise anything
        raise PlanError(f"--model {spec}: cannot import module {module_name!r}: {_one_line(error)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    function: Any = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise PlanError(
                f"--model {spec}: module {module_name!r} ({module.__file__}) has no attribute {attribute!r}"
            )
        function = getattr(function, part)
    if not callable(function):
        raise PlanError(f"--model {spec}: {attribute} is {type(function).__name__}, not a function")
    kwargs = {}
    if num_classes is not None:
        if not _takes(function, "num_classes"):
            raise PlanError(
                f"--model {spec}: {attribute}() takes no num_classes argument, but num_classes={num_classes} was "
                "given (--num-classes or the config's model.num_classes)"
            )
        kwargs["num_classes"] = num_classes
    call = f"{attribute}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        with torch.device("meta"):
            model = function(**kwargs)
    except Exception as error:  # the user's code may raise anything
        raise PlanError(f"--model {spec}: {call} on the meta device raised {_one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise PlanError(f"--model {spec}: {call} returned {type(model).__name__}, not an nn.Module")
    return model, _module_input_shape(module, module_name)


def _module_input_shape(module: object, module_name: str) -> tuple[int, ...] | None:
    value = getattr(module, INPUT_SHAPE_ATTRIBUTE, None)
    if value is None:
        return None
    valid = isinstance(value, tuple | list) and len(value) > 0 and all(type(v) is int and v >= 1 for v in value)
    if not valid:
        raise PlanError(f"{module_name}.{INPUT_SHAPE_ATTRIBUTE} must be a tuple of integers >= 1; got {value!r}")
    return tuple(value)


def _takes(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` accepts the keyword argument `name`."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _one_line(error: BaseException) -> str:
    """``Type: message`` on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
