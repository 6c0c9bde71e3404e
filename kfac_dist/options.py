"""K-FAC's options: one frozen object with every name, default, allowed range and one-line doc, and its checks.

:class:`KFACOptions` is the one place an option's default is written. ``KFACPreconditioner`` takes it (or the
same names as keyword arguments), the exchange, the planner and the closed-form costs read it, the YAML config's
``kfac`` section embeds it (``kfac_dist.app.config.schema.KFACConfig``) and ``kfac-dist plan``'s flags are
generated from its fields. Every bad value is a ValueError naming the option.

The preconditioner's other arguments describe the training loop (``lr``, ``loss_reduction``,
``accumulation_steps``, ``grad_scaler``) or the process (``communicator``, ``profile``), not K-FAC, and are its
own keyword arguments.

The defaults are chosen in docs/defaults.md: ``damping=1.0`` and ``kl_clip=1e-3`` by measurement, factors and
decompositions every step as in the K-FAC papers (large models set less frequent updates: see configs/).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch

from kfac_dist.comm.layout import DEFAULT_BUCKET_CAP_MB, DEFAULT_SYMMETRIC_COMM
from kfac_dist.fisher import FISHERS
from kfac_dist.methods import COMPUTE_METHODS, get_method
from kfac_dist.placement import (
    ASSIGNMENTS,
    DEFAULT_ASSIGNMENT,
    DEFAULT_GRAD_WORKER_FRACTION,
    STRATEGIES,
    resolve_grad_worker_fraction,
)
from kfac_dist.precision import PRECISIONS

#: A hyperparameter that may change as training runs: a callable of the K-FAC step (completed ``step()`` calls).
StepFunction = Callable[[int], float]
#: An integer hyperparameter: a constant or a :data:`StepFunction`.
IntHyper = int | StepFunction
#: A real hyperparameter: a constant or a :data:`StepFunction`.
FloatHyper = float | StepFunction
#: Any hyperparameter.
Hyper = float | int | StepFunction

LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_COMMS = ("owner", "allreduce")
#: dtypes by the names options use (a config names them; the library also takes the torch.dtype itself).
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
FACTOR_DTYPES = tuple(DTYPES)
INV_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Range:
    """An allowed range of a numeric option."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    integer: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in interval notation."""
        kind = "an integer" if self.integer else "a number"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"{kind} in {left}{self.low:g}, {high}{right}"


def check_value(option: str, value: object, allowed: Range, step: int | None = None) -> float:
    """Return ``value`` as a number if it lies in ``allowed``, else raise ValueError naming ``option``."""
    where = f" (returned by its callable at step {step})" if step is not None else ""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value, is_number = value.item(), True
    if (
        not is_number
        or not isinstance(value, (int, float))
        or not allowed.contains(float(value))
        or (allowed.integer and float(value) != int(value))
    ):
        raise ValueError(f"{option} must be {allowed.describe()}; got {value!r}{where}")
    return int(value) if allowed.integer else float(value)


def check_hyper(option: str, value: object, allowed: Range) -> Hyper:
    """Validate a hyperparameter that may be a constant or a callable of the step."""
    if callable(value):
        return cast(StepFunction, value)
    check_value(option, value, allowed)
    return cast(Hyper, value)  # a valid number (or one-element tensor), returned as given


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> str:
    """Validate a string option against its choices."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def check_patterns(option: str, value: object) -> tuple[str, ...]:
    """Validate a collection of glob patterns (a single string is accepted as one pattern)."""
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(cast(Iterable[object], value))  # a non-iterable raises the TypeError caught below
    except TypeError:
        raise ValueError(f"{option} must be a string or a sequence of strings; got {value!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{option} must be a string or a sequence of strings; got {value!r}")
    return cast(tuple[str, ...], patterns)


def check_flag(option: str, value: object) -> bool:
    """Validate a boolean option."""
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")
    return value


def dtype_name(option: str, value: object, choices: tuple[str, ...]) -> str:
    """The name of a dtype option given as a name or a torch.dtype, checked against ``choices``."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    name = names.get(value, value) if isinstance(value, torch.dtype) else value
    if name not in choices:
        allowed = ", ".join(f"{c!r} (torch.{c})" for c in choices)
        raise ValueError(f"{option} must be one of {allowed}; got {value!r}")
    return str(name)


def _option(
    default: Any, doc: str, *, allowed: Range | None = None, choices: Iterable[str] = (), plans: bool = False
) -> Any:
    """A field of :class:`KFACOptions`: its default, one-line doc, range and choices (the config reads the same).

    ``plans``: the option changes the placement, bytes or memory (``kfac-dist plan`` has a flag for it).
    """
    metadata = {"doc": doc, "range": allowed, "choices": tuple(choices), "plans": plans}
    return dataclasses.field(default=default, metadata=metadata)


_PERIOD = Range(1, integer=True)
_POSITIVE = Range(0, low_open=True)
#: Ranges of the preconditioner's numeric arguments that describe the training loop, not K-FAC.
LOOP_RANGES = {"lr": Range(0), "accumulation_steps": Range(1, integer=True)}


@dataclass(frozen=True, kw_only=True)
class KFACOptions:
    """Every option of K-FAC itself, validated on construction (see the module docstring).

    ``factor_update_steps``, ``inv_update_steps``, ``damping``, ``factor_decay`` and ``kl_clip`` may be callables of
    the K-FAC step (the number of completed ``step()`` calls); they are checked each time they are read.
    """

    factor_update_steps: IntHyper = _option(
        1,
        "Factors are captured and updated on steps k with k % factor_update_steps == 0.",
        allowed=_PERIOD,
        plans=True,
    )
    factor_warmup_steps: int = _option(
        0,
        "Factors are also captured and updated on every step k < factor_warmup_steps (early in training they change "
        "fastest); the planner's amortised bytes are those after it.",
        allowed=Range(0, integer=True),
    )
    inv_update_steps: IntHyper = _option(
        1,
        "Decompositions are recomputed on steps k with k % inv_update_steps == 0.",
        allowed=_PERIOD,
        plans=True,
    )
    inv_stagger: bool = _option(
        False,
        "Spread the decompositions over the inv_update_steps steps of a period (each layer at its own phase) "
        "instead of all on one step; see kfac_dist.schedule.",
        plans=True,
    )
    damping: FloatHyper = _option(
        1.0, "Tikhonov damping of the Kronecker-factored curvature, in kfac-dist's factor scale.", allowed=_POSITIVE
    )
    adaptive_damping: bool = _option(
        False,
        "Adjust the damping by the Levenberg-Marquardt rule on factor steps (KFACPreconditioner.adapt_damping after "
        "the optimizer's step); 'damping' is its start; see kfac_dist.damping.",
    )
    factor_decay: FloatHyper = _option(0.95, "Running-average decay of the factors.", allowed=Range(0, 1))
    kl_clip: FloatHyper | None = _option(
        1e-3, "KL-clip bound (Ba et al. 2017) on the preconditioned step; None disables clipping.", allowed=_POSITIVE
    )
    compute_method: str = _option(
        "eigen",
        "'eigen' (exact damped Kronecker inverse), 'inverse' (factored damping with pi) or 'eigen_warm' (eigen, "
        "warm-started from the last eigenbases); see kfac_dist.methods.",
        choices=COMPUTE_METHODS,
        plans=True,
    )
    grad_worker_fraction: float | str = _option(
        DEFAULT_GRAD_WORKER_FRACTION,
        "Fraction of ranks preconditioning each layer, in (0, 1], or 'mem-opt' (1/W), 'hybrid-opt', 'comm-opt' (1).",
        allowed=Range(0, 1, low_open=True, high_open=False),
        choices=STRATEGIES,
        plans=True,
    )
    assignment: str = _option(
        DEFAULT_ASSIGNMENT, "The cost that orders the placement of layers on ranks.", choices=ASSIGNMENTS, plans=True
    )
    factor_comm: str = _option(
        "owner",
        "'owner' (factors reduced to the rank that decomposes them) or 'allreduce' (KAISA).",
        choices=FACTOR_COMMS,
        plans=True,
    )
    symmetric_comm: bool = _option(DEFAULT_SYMMETRIC_COMM, "Send symmetric matrices as upper triangles.", plans=True)
    bucket_cap_mb: float = _option(
        DEFAULT_BUCKET_CAP_MB, "Size of the fusion buckets of every exchange, in MiB.", allowed=_POSITIVE, plans=True
    )
    inv_dtype: str | torch.dtype = _option("float32", "dtype of the decompositions.", choices=INV_DTYPES, plans=True)
    factor_dtype: str | torch.dtype | None = _option(
        None,
        "dtype of the factors; None: the weights' dtype, at least float32.",
        choices=FACTOR_DTYPES,
        plans=True,
    )
    fisher: str = _option(
        "empirical",
        "The Fisher the G factors estimate: 'empirical' (the data's labels) or 'mc' (labels sampled from the model; "
        "needs KFACPreconditioner.backward); see kfac_dist.fisher.",
        choices=FISHERS,
    )
    precision: str = _option(
        "highest",
        "Precision of K-FAC's own matrix products: 'highest' (exact), 'tf32' (CUDA) or 'bf16' inputs; "
        "see kfac_dist.precision.",
        choices=PRECISIONS,
    )
    skip_layers: tuple[str, ...] = _option(
        (), "Glob patterns of module names or class names not to precondition.", plans=True
    )

    def __post_init__(self) -> None:
        """Check every option (a ValueError naming it) and normalise dtypes to names and patterns to a tuple."""
        meta = {item.name: item.metadata for item in dataclasses.fields(self)}
        for name in ("factor_update_steps", "inv_update_steps", "damping", "factor_decay"):
            check_hyper(name, getattr(self, name), meta[name]["range"])
        if self.kl_clip is not None:
            check_hyper("kl_clip", self.kl_clip, meta["kl_clip"]["range"])
        get_method(self.compute_method)  # the table as it is now: a method registered at run time is valid
        for name in ("assignment", "factor_comm", "fisher", "precision"):
            check_choice(name, getattr(self, name), meta[name]["choices"])
        resolve_grad_worker_fraction(self.grad_worker_fraction, 1)
        check_flag("symmetric_comm", self.symmetric_comm)
        check_flag("inv_stagger", self.inv_stagger)
        check_value("factor_warmup_steps", self.factor_warmup_steps, meta["factor_warmup_steps"]["range"])
        check_flag("adaptive_damping", self.adaptive_damping)
        if self.adaptive_damping and callable(self.damping):
            raise ValueError("adaptive_damping starts from a constant damping; got a callable")
        if self.inv_stagger and callable(self.inv_update_steps):
            raise ValueError("inv_stagger needs a constant inv_update_steps (phases divide one period)")
        check_value("bucket_cap_mb", self.bucket_cap_mb, meta["bucket_cap_mb"]["range"])
        object.__setattr__(self, "inv_dtype", dtype_name("inv_dtype", self.inv_dtype, INV_DTYPES))
        if self.factor_dtype is not None:
            object.__setattr__(self, "factor_dtype", dtype_name("factor_dtype", self.factor_dtype, FACTOR_DTYPES))
        object.__setattr__(self, "skip_layers", check_patterns("skip_layers", self.skip_layers))

    def value(self, name: str, step: int) -> float:
        """The value of a numeric option at K-FAC step ``step`` (a callable is called and its result checked)."""
        current, allowed = getattr(self, name), range_of(name)
        if callable(current):
            return check_value(name, current(step), allowed, step)
        return check_value(name, current, allowed)

    def at_step(self, step: int) -> KFACOptions:
        """These options with every callable replaced by its value at ``step``."""
        values: dict[str, Any] = {
            f.name: self.value(f.name, step) for f in dataclasses.fields(self) if callable(getattr(self, f.name))
        }
        return dataclasses.replace(self, **values)

    def inverse_dtype(self) -> torch.dtype:
        """``inv_dtype`` as a torch.dtype."""
        return DTYPES[str(self.inv_dtype)]

    def factor_dtype_for(self, grad_dtype: torch.dtype) -> torch.dtype:
        """The factors' dtype for `grad_dtype` gradients: ``factor_dtype``, else the gradients' (at least float32)."""
        if self.factor_dtype is not None:
            return DTYPES[str(self.factor_dtype)]
        return grad_dtype if grad_dtype in (torch.float32, torch.float64) else torch.float32

    def to_dict(self) -> dict[str, object]:
        """The options by name, in field order (callables as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def range_of(option: str) -> Range:
    """The allowed range of a numeric option of :class:`KFACOptions` or of :data:`LOOP_RANGES`."""
    return LOOP_RANGES[option] if option in LOOP_RANGES else OPTION_FIELDS[option].metadata["range"]


#: The fields of :class:`KFACOptions` by name (defaults, docs, ranges and choices in their metadata).
OPTION_FIELDS: Mapping[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(KFACOptions)}


class OptionOverrides(TypedDict, total=False):
    """:class:`KFACOptions` fields as keyword arguments (``KFACPreconditioner(model, damping=0.1)``).

    Types only: the defaults, ranges and docs are the fields' (tests/test_options.py checks the names agree).
    """

    factor_update_steps: IntHyper
    factor_warmup_steps: int
    inv_update_steps: IntHyper
    inv_stagger: bool
    damping: FloatHyper
    adaptive_damping: bool
    factor_decay: FloatHyper
    kl_clip: FloatHyper | None
    compute_method: str
    grad_worker_fraction: float | str
    assignment: str
    factor_comm: str
    symmetric_comm: bool
    bucket_cap_mb: float
    inv_dtype: str | torch.dtype
    factor_dtype: str | torch.dtype | None
    fisher: str
    precision: str
    skip_layers: Iterable[str] | str
