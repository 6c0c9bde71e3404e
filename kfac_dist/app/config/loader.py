"""Reading configs: YAML (safe loader only) + ``key.path=value`` overrides -> a validated :class:`Config`.

Every problem stops the load with one :class:`ConfigError` that names the file (or the override), the key path,
what is wrong and what is allowed. YAML is read with a ``yaml.SafeLoader`` subclass: it builds only plain data
(mappings, lists, strings, numbers, booleans, null), so a config can never construct a Python object. The
subclass also reads ``1e-3`` as a number (YAML 1.1 needs ``1.0e-3``) and rejects a key given twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kfac_dist.app.config.fields import ConfigError, Section, describe_type, field_types, section_type
from kfac_dist.app.config.schema import Config

__all__ = [
    "DEFAULTS_SOURCE",
    "FINGERPRINT_SECTIONS",
    "config_fingerprint",
    "config_to_dict",
    "format_config",
    "load_config",
]

#: How errors name the built-in defaults (``load_config(None)``).
DEFAULTS_SOURCE = "<built-in defaults>"
#: What must match for a checkpoint to be resumed: the model and the data set it was trained on.
FINGERPRINT_SECTIONS = ("model", "data.name")

_FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |\.(?:inf|Inf|INF))$
    |^\.(?:nan|NaN|NAN)$""",
    re.VERBOSE,
)


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        """Build a mapping, refusing a key that appears twice in it."""
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice in this mapping", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _parse_yaml(text: str, source: str) -> object:
    """Plain data from YAML ``text``; any YAML error (syntax, a Python tag, ...) is a ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # a yaml.SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = str(error.problem or error.context)
        if "could not determine a constructor" in problem:
            problem = f"tag {problem.split('tag ', 1)[-1]} is not allowed"
        raise ConfigError(
            (where,), problem, "plain YAML data: mappings, lists, strings, numbers, booleans, null", source=source
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(("YAML",), str(error), source=source) from None


class _Sources:
    """Which file or override set each key, so an error names the right one."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.overrides: list[tuple[tuple[str, ...], str]] = []

    def of(self, paths: Sequence[tuple[str, ...]]) -> str:
        """The source of the latest override that set one of ``paths`` (or a key above or below it), else the file."""
        for override_path, source in reversed(self.overrides):
            for path in paths:
                shorter = min(len(path), len(override_path))
                if path[:shorter] == override_path[:shorter]:
                    return source
        return self.file

    def locate(self, error: ConfigError, prefix: tuple[str, ...] = ()) -> ConfigError:
        """``error`` (raised by a section at ``prefix``) with its full key path and its source."""
        if error.source is not None:
            return error
        keys = [(*prefix, *error.key), *((*prefix, *path) for path in error.related)]
        return error.located(prefix, self.of(keys))


def _all_keys(cls: type[Section], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of the schema below ``cls``."""
    for name, annotation in field_types(cls).items():
        yield (*prefix, name)
        nested = section_type(annotation)
        if nested is not None:
            yield from _all_keys(nested, (*prefix, name))


def _unknown_key(cls: type[Section], path: tuple[str, ...], source: str) -> ConfigError:
    """The error for an unknown key ``path[-1]`` in section ``cls``, suggesting the closest valid key."""
    key, names = str(path[-1]), [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1) or [name for name in names if key in name or name in key]
    if close:
        hint = f"; did you mean {'.'.join((*path[:-1], close[0]))!r}?"
    else:
        elsewhere = [
            k for k in _all_keys(Config) if k[-1] == key or difflib.get_close_matches(key, [k[-1]], cutoff=0.8)
        ]
        hint = f"; did you mean {'.'.join(elsewhere[0])!r}?" if elsewhere else ""
    return ConfigError(path, f"unknown key{hint}", ", ".join(names), source=source)


def _build(cls: type[Section], raw: Mapping[Any, Any], path: tuple[str, ...], sources: _Sources) -> Section:
    """Construct section ``cls`` at ``path`` from a YAML mapping, nested sections first."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(cls, (*path, str(key)), sources.of([(*path, str(key))]))
        nested = section_type(field_types(cls)[key])
        kwargs[key] = _build(nested, value, (*path, key), sources) if nested and isinstance(value, dict) else value
    for name, item in fields.items():
        if name not in kwargs and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            allowed = describe_type(field_types(cls)[name], item.metadata)
            raise ConfigError((*path, name), "is required", allowed, source=sources.of([path]))
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise sources.locate(error, path) from None


def _apply_override(raw: dict[str, Any], text: str, sources: _Sources) -> None:
    """Set ``key.path=value`` in the raw config mapping, checking the key path against the schema."""
    source = f"override {text!r}"
    key, sep, value_text = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(("override",), f"{text!r} is not key.path=value", "e.g. kfac.damping=0.5", source=source)
    path = tuple(part.strip() for part in key.split("."))
    value = _parse_yaml(value_text, source)
    cls: type[Section] = Config
    node = raw
    for depth, name in enumerate(path):
        if name not in field_types(cls):
            raise _unknown_key(cls, path[: depth + 1], source)
        if depth == len(path) - 1:
            break
        nested = section_type(field_types(cls)[name])
        if nested is None:
            raise ConfigError(path[: depth + 1], "is a value, not a section", "", source=source)
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node, cls = node[name], nested
    node[path[-1]] = _merge(node.get(path[-1]), value)
    sources.overrides.append((path, source))


def _merge(old: object, new: object) -> object:
    """``new``, with the keys of ``old`` it does not set when both are mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a run config.

    Args:
        path: A YAML file; None for the built-in defaults (the content of configs/mnist_cnn.yaml). Keys it leaves
            out take their defaults; an empty file is an error (``{}`` asks for the defaults).
        overrides: ``key.path=value`` strings applied in order; each value is read as YAML (``kfac.damping=0.5``,
            ``kfac.kl_clip=null``, ``kfac.skip_layers=[fc]``, ``kfac.damping_schedule={milestones: [5], values:
            [0.1]}``); a mapping value sets only the keys it names.

    Returns:
        The validated config.

    Raises:
        ConfigError: For an unreadable, non-UTF-8 or empty file, bad YAML, a Python tag, an unknown key, a wrong
            type, an out-of-range value or inconsistent values; the message names the file or override, the key path
            and what is allowed.
    """
    source = DEFAULTS_SOURCE if path is None else str(path)
    raw: object = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(("file",), f"cannot be read ({error.strerror or error})", "", source=source) from None
        except UnicodeDecodeError as error:
            problem = f"is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
            raise ConfigError(("file",), problem, "a YAML file in UTF-8", source=source) from None
        raw = _parse_yaml(text, source)
        if raw is None:  # an empty file (or only comments) is almost always a mistake, not a wish for the defaults
            raise ConfigError(
                ("file",), "is empty", "a mapping of sections; {} for the built-in defaults", source=source
            )
    if not isinstance(raw, dict):
        raise ConfigError((), f"expected a mapping of sections, got {type(raw).__name__}", "", source=source)
    sources = _Sources(source)
    for text in overrides:
        _apply_override(raw, text, sources)
    config = _build(Config, raw, (), sources)
    assert isinstance(config, Config)
    return config


def config_to_dict(cfg: Section) -> dict[str, Any]:
    """The config as plain data (nested dicts, lists), as it would be written in YAML."""

    def plain(value: object) -> object:
        if isinstance(value, Section):
            return config_to_dict(value)
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        return value

    return {item.name: plain(getattr(cfg, item.name)) for item in dataclasses.fields(cfg)}


def format_config(cfg: Config) -> str:
    """The resolved config as YAML (every key, in schema order); ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def config_fingerprint(cfg: Config, sections: Sequence[str] = FINGERPRINT_SECTIONS) -> str:
    """A stable hash of the named sections or dotted keys, to refuse a checkpoint from another model or data set.

    Args:
        cfg: The config.
        sections: Section names (``"model"``) or dotted key paths (``"data.name"``).

    Returns:
        16 hex digits of the SHA-256 of the selected values (canonical JSON); equal configs give equal hashes.

    Raises:
        ValueError: If a name is not a section or key of the config.
    """
    everything = config_to_dict(cfg)
    selected: dict[str, object] = {}
    for name in sections:
        value: object = everything
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"config_fingerprint: {name!r} is not a section or key of the config")
            value = value[part]
        selected[name] = value
    return hashlib.sha256(json.dumps(selected, sort_keys=True).encode()).hexdigest()[:16]
