"""Typed, validated config sections: the error type, field options and the checks every section runs.

A section is a frozen, keyword-only dataclass deriving from :class:`Section`. Each field's type annotation says
what it accepts (``bool``, ``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]``, a nested section, or a
union such as ``float | str``); :func:`option` adds an allowed range for numbers and the choices for strings.
``Section.__post_init__`` checks every field against both, converts YAML's lists to tuples and ints to floats
where a float is expected, then runs the section's own cross-field checks (``_check``). So a section is valid
however it was made: by the YAML loader or directly in code.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

import torch

from kfac_dist.options import Range

__all__ = ["ConfigError", "Section", "describe_type", "field_types", "option", "section_type"]

_MISSING: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """An invalid config: one message ``"<source>: <key.path>: <what is wrong>; allowed: <...>"``.

    Attributes:
        key: Path of the offending key from the config's root (or from the section, before the loader locates it).
        problem: What is wrong.
        allowed: What would be accepted ("" when nothing sensible can be listed).
        related: Paths of other keys a cross-field problem involves (the loader uses them to name an override).
        source: The file or override the value came from; None for a section built in code.
    """

    def __init__(
        self,
        key: Sequence[str],
        problem: str,
        allowed: str = "",
        related: Sequence[Sequence[str]] = (),
        source: str | None = None,
    ) -> None:
        self.key = tuple(key)
        self.problem = problem
        self.allowed = allowed
        self.related = tuple(tuple(path) for path in related)
        self.source = source
        where = f"{source}: " if source else ""
        name = ".".join(self.key) or "<top level>"
        super().__init__(f"{where}{name}: {problem}" + (f"; allowed: {allowed}" if allowed else ""))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[object, ...]]:
        """Pickle with every attribute (an error may cross a process boundary)."""
        return type(self), (self.key, self.problem, self.allowed, self.related, self.source)

    def located(self, prefix: Sequence[str], source: str) -> ConfigError:
        """The same error with the section's path in front of its keys and the source named."""
        return ConfigError(
            (*prefix, *self.key),
            self.problem,
            self.allowed,
            related=[(*prefix, *path) for path in self.related],
            source=source,
        )


def option(
    default: Any = _MISSING,
    *,
    low: float | None = None,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    choices: Sequence[str] = (),
) -> Any:
    """A dataclass field with its allowed range (numbers, and the items of a tuple of numbers) and choices (strings).

    Args:
        default: The default value; omitted for a required field.
        low: Lower bound of a number; None for no range.
        high: Upper bound of a number.
        low_open: Whether ``low`` itself is excluded.
        high_open: Whether ``high`` itself is excluded.
        choices: The strings a string value may take; empty for any string.
    """
    bounds = None if low is None else Range(low, high, low_open=low_open, high_open=high_open)
    return dataclasses.field(default=default, metadata={"range": bounds, "choices": tuple(choices)})


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (or the annotation itself) that a YAML value can take.

    A library option (:class:`kfac_dist.options.KFACOptions`) may also take a callable of the step or a
    ``torch.dtype``; a config cannot, so those members are left out.
    """
    members = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return tuple(m for m in members if get_origin(m) is not collections.abc.Callable and m is not torch.dtype)


def section_type(annotation: Any) -> type[Section] | None:
    """The section class in a field's annotation (``ModelConfig`` or ``ModelConfig | None``), if there is one."""
    for member in _alternatives(annotation):
        if isinstance(member, type) and issubclass(member, Section):
            return member
    return None


def field_types(cls: type[Section]) -> dict[str, Any]:
    """The evaluated annotations of a section's fields."""
    return get_type_hints(cls)


def _describe_number(bounds: Range | None, integer: bool) -> str:
    """``an integer in [1, inf)``, ``a number in (0, 1]``, or just the kind when there is no range."""
    kind = "an integer" if integer else "a number"
    if bounds is None:
        return kind

    def show(limit: float) -> str:
        return "inf" if math.isinf(limit) else str(int(limit)) if integer else f"{limit:g}"

    left, right = "(" if bounds.low_open else "[", ")" if bounds.high_open else "]"
    return f"{kind} in {left}{show(bounds.low)}, {show(bounds.high)}{right}"


def describe_type(annotation: Any, metadata: typing.Mapping[str, Any]) -> str:
    """What a field accepts, in words (e.g. ``a number in (0, inf) or null``)."""
    parts = []
    for member in _alternatives(annotation):
        if member is type(None):
            parts.append("null")
        elif member is bool:
            parts.append("true or false")
        elif member is int or member is float:
            parts.append(_describe_number(metadata.get("range"), integer=member is int))
        elif member is str:
            choices = metadata.get("choices") or ()
            parts.append(f"one of {', '.join(map(repr, choices))}" if choices else "a string")
        elif get_origin(member) is tuple:
            parts.append(f"a list, each {describe_type(get_args(member)[0], metadata)}")
        elif isinstance(member, type) and issubclass(member, Section):
            parts.append(f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(member))}")
        else:  # pragma: no cover - a schema bug, not a config error
            raise TypeError(f"unsupported config annotation {member!r}")
    return " or ".join(parts)


def _yaml_kind(value: object) -> str:
    """How a value reads in YAML terms, for error messages (``'abc' (a string)``)."""
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    if value is None:
        return "null"
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, bool):
        return f"{str(value).lower()} ({kind})"
    if isinstance(value, (dict, list, tuple)) or isinstance(value, Section):
        return kind
    return f"{value!r} ({kind})"


class _Mismatch(Exception):
    """A value has a type the annotation does not accept, or is outside its range or choices."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _convert(value: object, annotation: Any, metadata: typing.Mapping[str, Any]) -> object:
    """``value`` checked against ``annotation`` and converted (list -> tuple, int -> float), or raise _Mismatch."""
    out_of_range = None
    for member in _alternatives(annotation):
        if member is type(None) and value is None:
            return None
        if member is bool and isinstance(value, bool):
            return value
        if (member is int or member is float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if member is int and not isinstance(value, int):
                continue
            bounds = metadata.get("range")
            if bounds is None or bounds.contains(float(value)):
                return value if member is int else float(value)
            out_of_range = f"{value!r} is out of range"
        elif member is str and isinstance(value, str):
            choices = metadata.get("choices") or ()
            if not choices or value in choices:
                return value
            out_of_range = f"{value!r} is not one of the choices"
        elif get_origin(member) is tuple and isinstance(value, (list, tuple)):
            item_type = get_args(member)[0]
            try:
                return tuple(_convert(item, item_type, metadata) for item in value)
            except _Mismatch as error:
                out_of_range = f"list item {error.problem}"
        elif isinstance(member, type) and issubclass(member, Section) and isinstance(value, member):
            return value
    raise _Mismatch(out_of_range or f"wrong type: {_yaml_kind(value)}")


class Section:
    """Base of every config section: validates each field on construction (see the module docstring)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass

    def __post_init__(self) -> None:
        """Check and convert every field, then run the section's cross-field checks."""
        types_ = field_types(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            try:
                converted = _convert(value, types_[item.name], item.metadata)
            except _Mismatch as error:
                allowed = describe_type(types_[item.name], item.metadata)
                raise ConfigError((item.name,), error.problem, allowed) from None
            object.__setattr__(self, item.name, converted)
        self._check()

    def _check(self) -> None:
        """Cross-field checks of the section; raise :class:`ConfigError` via :meth:`_fail`."""

    def _fail(self, key: str, problem: str, allowed: str = "", *, related: Sequence[str] = ()) -> ConfigError:
        """A cross-field error at ``key``; ``related`` names the other keys involved (dotted, from this section)."""
        return ConfigError(tuple(key.split(".")), problem, allowed, related=[tuple(r.split(".")) for r in related])
