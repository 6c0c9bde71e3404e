"""Validation of the preconditioner's options: every bad value is a ValueError naming the option."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch

#: A hyperparameter: a constant or a callable of the K-FAC step (the number of completed ``step()`` calls).
Hyper = float | int | Callable[[int], float]

COMPUTE_METHODS = ("eigen", "inverse")
LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_COMMS = ("owner", "allreduce")


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


RANGES: dict[str, Range] = {
    "factor_update_steps": Range(1, integer=True),
    "inv_update_steps": Range(1, integer=True),
    "accumulation_steps": Range(1, integer=True),
    "damping": Range(0, low_open=True),
    "factor_decay": Range(0, 1),
    "kl_clip": Range(0, low_open=True),
    "lr": Range(0),
    "bucket_cap_mb": Range(0, low_open=True),
}


def check_value(option: str, value: object, step: int | None = None) -> float:
    """Return ``value`` as a number if it is valid for ``option``, else raise ValueError naming both."""
    allowed = RANGES[option]
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


def check_hyper(option: str, value: object) -> Hyper:
    """Validate a hyperparameter that may be a constant or a callable of the step."""
    if callable(value):
        return value
    check_value(option, value)
    return cast(Hyper, value)  # a valid number (or one-element tensor), returned as given


def resolve(option: str, value: Hyper, step: int) -> float:
    """The value of a hyperparameter at ``step``, validated."""
    if callable(value):
        return check_value(option, value(step), step)
    return check_value(option, value)


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> str:
    """Validate a string option against its choices."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def check_dtype(option: str, value: object, allowed: tuple[torch.dtype, ...], allow_none: bool) -> torch.dtype | None:
    """Validate a dtype option."""
    if value is None and allow_none:
        return None
    if value not in allowed:
        names = ", ".join(str(d) for d in allowed) + (" or None" if allow_none else "")
        raise ValueError(f"{option} must be one of {names}; got {value!r}")
    return value


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
