"""What a resumed run takes from its checkpoint and what from its config.

A checkpoint restores *state*: the weights, the optimizer's buffers (momentum, Adam's moments), K-FAC's factors,
decompositions and step counter, the RNG states and the position (epoch, step). The config supplies every
*hyperparameter*: the lr schedule (the lr is recomputed from the position every step), the optimizer's momentum,
nesterov, betas and weight decay (applied over the values ``optimizer.load_state_dict`` restores), and every K-FAC
option (damping, update periods, KL-clip, ...: the preconditioner takes them from the config, not from its state).

What the state was made for may not change: the keys of :data:`FIXED_KEYS` (the network and the data set it was
trained on, and the optimizer type, whose buffers another type cannot use). A checkpoint written with other values
is refused with one :class:`ConfigError` line naming each key, both values and the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kfac_dist.app.config import Config, ConfigError, config_fingerprint, config_to_dict

__all__ = ["FIXED_KEYS", "apply_hyperparameters", "check_resumable", "hyperparameters", "identity"]

#: Config keys a checkpoint must have been written with to be resumed (stored in its ``meta``).
FIXED_KEYS = ("model.name", "model.num_classes", "model.width_multiplier", "data.name", "optimizer.name")


def _value(cfg: Config, key: str) -> object:
    value: Any = config_to_dict(cfg)
    for part in key.split("."):
        value = value[part]
    return value


def identity(cfg: Config) -> dict[str, str]:
    """The ``meta`` fields a checkpoint of this config carries.

    Each of :data:`FIXED_KEYS` (as ``repr``) and the config fingerprint (which older checkpoints carry alone).
    """
    fields = {key: repr(_value(cfg, key)) for key in FIXED_KEYS}
    fields["config_fingerprint"] = config_fingerprint(cfg)
    return fields


def _optimizer_names(optimizer_state: Mapping[str, Any]) -> tuple[str, ...]:
    """The optimizer types a saved ``optimizer.state_dict()`` can come from (for checkpoints without the field)."""
    groups = optimizer_state.get("param_groups") or [{}]
    if "momentum" in groups[0]:
        return ("sgd",)
    if "betas" in groups[0]:
        decoupled = groups[0].get("decoupled_weight_decay")
        return ("adam", "adamw") if decoupled is None else ("adamw",) if decoupled else ("adam",)
    return ()


def check_resumable(meta: Mapping[str, str], state: Mapping[str, Any], cfg: Config, path: Path) -> None:
    """Refuse a checkpoint written with other :data:`FIXED_KEYS` than ``cfg``'s.

    Raises:
        ConfigError: At ``checkpoint.resume``, one line naming every differing key with both values and ``path``.
    """
    differences = []
    for key in FIXED_KEYS:
        ours = repr(_value(cfg, key))
        if key in meta:
            theirs = meta[key]
        elif key == "model.name" and "model" in meta:  # an older checkpoint: the name alone
            theirs = repr(meta["model"])
        elif key == "optimizer.name":  # an older checkpoint: tell the type from the saved state
            names = _optimizer_names(state.get("optimizer", {}))
            theirs = ours if not names or cfg.optimizer.name in names else repr(names[0])
        else:
            continue
        if theirs != ours:
            differences.append(f"{key}={theirs}, this config says {ours}")
    fingerprint = meta.get("config_fingerprint")
    if not differences and "data.name" not in meta and fingerprint not in (None, config_fingerprint(cfg)):
        differences.append("another model section or data.name than this config's (the config fingerprint differs)")
    if differences:
        raise ConfigError(
            ("checkpoint", "resume"),
            f"the checkpoint {path} was written with " + "; and with ".join(differences),
            "the same model, data.name and optimizer.name as the checkpoint, or checkpoint.resume=none (or another "
            "logging.dir) to start a new run",
        )


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyperparameters (all but ``params``), as the config built them."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, configured: Sequence[Mapping[str, Any]]) -> list[str]:
    """Put the config's hyperparameters back after ``optimizer.load_state_dict`` restored the checkpoint's.

    Returns:
        ``"<name> <checkpoint's> -> <config's>"`` for each value that changed (``lr`` is left out: the schedule
        sets it every step).
    """
    changes: dict[str, str] = {}
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        for key, value in values.items():
            if key != "lr" and group.get(key) != value:
                changes.setdefault(key, f"{key} {group.get(key)!r} -> {value!r}")
        group.update(values)
    return list(changes.values())
