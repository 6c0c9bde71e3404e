"""Checkpoints: one file per save, written atomically by one process, loaded without running any code.

A checkpoint is ``<directory>/ckpt-epoch{epoch:04d}-step{step:08d}.pt``, a `torch.save` of the dict

    {"format": "kfac-dist-checkpoint", "version": 1, "epoch": int, "step": int, "meta": {str: str}, "state": {...}}

- ``state`` is what the trainer saves (model, optimizer, lr schedule, preconditioner, RNG states, ...). It may hold
  only what ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, bytes, None, torch dtypes /
  devices / sizes, and dict / list / tuple / set of them. `save_checkpoint` checks this before writing and names
  the offending key, so a run never writes a checkpoint it cannot resume from.
- ``meta`` holds identity fields (model name, config fingerprint, ...); `load_checkpoint` refuses a checkpoint
  whose fields differ from the run's with `CheckpointMismatch`, naming each field, both values and the path.
- Writing is atomic: a temporary file in the same directory (``.ckpt-....pt.<random>.tmp``), flushed and
  fsync'ed, then `os.replace` onto the final name, then an fsync of the directory. A crash at any point leaves
  either the old set of checkpoints or the old set plus the new complete file; a partial file never has a final
  name. One process (rank 0) writes to a directory; each save removes temporary files left by earlier crashes.
- `latest_checkpoint` picks the newest final name by (epoch, step), without opening files: only a complete,
  fsync'ed file is ever renamed to a final name.
- Loading uses ``torch.load(path, map_location="cpu", weights_only=True)``: a file holding pickled objects of
  other classes is refused before any of its code runs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "kfac-dist-checkpoint"
VERSION = 1
_NAME = re.compile(r"ckpt-epoch(\d+)-step(\d+)\.pt")
_TEMP = re.compile(r"\.ckpt-epoch\d+-step\d+\.pt\..*\.tmp")
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupt, not a checkpoint, or holding disallowed objects."""


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with another model or configuration."""


def checkpoint_name(epoch: int, step: int) -> str:
    """The file name of the checkpoint after `epoch` at global step `step`."""
    return f"ckpt-epoch{epoch:04d}-step{step:08d}.pt"


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    epoch: int,
    step: int,
    keep: int,
    meta: Mapping[str, str] | None = None,
) -> Path:
    """Write `state` atomically as the checkpoint of (`epoch`, `step`); keep the newest `keep`; return its path.

    Pruning never deletes the file just written: it keeps that file and the newest ``keep - 1`` others by
    (epoch, step). Call it on one rank only.

    Raises:
        ValueError: `epoch` or `step` < 0, `keep` < 1, or `meta` not a dict of strings.
        TypeError: `state` holds something ``weights_only`` loading refuses; the message names its key.
    """
    for name, value, low in (("epoch", epoch, 0), ("step", step, 0), ("keep", keep, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"save_checkpoint: {name}={value!r} must be an integer >= {low}")
    meta = dict(meta or {})
    bad_meta = [key for key, value in meta.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad_meta:
        raise ValueError(f"save_checkpoint: meta fields must map strings to strings; not so for {bad_meta}")
    _check_loadable(dict(state), "state")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(epoch, step)
    payload = {"format": FORMAT, "version": VERSION, "epoch": epoch, "step": step, "meta": meta, "state": dict(state)}
    fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(folder)
    for stale in folder.iterdir():
        if _TEMP.fullmatch(stale.name):
            stale.unlink(missing_ok=True)  # left by a writer that crashed
    others = [path for path in list_checkpoints(folder) if path != final]
    for old in others[: max(0, len(others) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints in `directory` (final names only), oldest first by (epoch, step); [] if it does not exist."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(match, path) for path in folder.iterdir() if (match := _NAME.fullmatch(path.name)) and path.is_file()]
    found.sort(key=lambda item: (int(item[0].group(1)), int(item[0].group(2))))
    return [path for _, path in found]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint in `directory` by (epoch, step), or None; temporary files are never candidates."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | os.PathLike[str], *, expected: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` and check its identity fields.

    Args:
        path: A checkpoint file.
        expected: Identity fields of this run (e.g. ``{"model": "resnet50", "config_fingerprint": "..."}``);
            each must equal the checkpoint's ``meta`` field of the same name. Fields only the checkpoint has
            are not compared.

    Returns:
        The saved dict: ``epoch``, ``step``, ``meta``, ``state`` (and ``format``, ``version``).

    Raises:
        FileNotFoundError: No file at `path`.
        CheckpointError: The file is truncated or corrupt, not a kfac-dist checkpoint, or holds objects that
            ``weights_only`` loading refuses (none of their code runs); the message names the path.
        CheckpointMismatch: An identity field differs; the message names each field and both values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(error))
        if reason is None:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt file ({error})") from error
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers, and checkpoints "
            f"load with weights_only=True so that no code from a file runs ({reason.group(1)})"
        ) from error
    except Exception as error:
        why = f"{type(error).__name__}: {error}".split(". ")[0]
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt file ({why})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kfac-dist checkpoint (no format={FORMAT!r} field)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this code reads {VERSION}")
    meta = payload.get("meta", {})
    differences = [
        f"{key}: {meta[key]!r} in the checkpoint, {value!r} in this run"
        if key in meta
        else f"{key}: absent in the checkpoint, {value!r} in this run"
        for key, value in (expected or {}).items()
        if meta.get(key) != value
    ]
    if differences:
        raise CheckpointMismatch(f"checkpoint {path} is from another model or config:\n  " + "\n  ".join(differences))
    return payload


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python `random`, numpy's global RNG, torch CPU, torch CUDA if available).

    The result holds only ``weights_only``-loadable values. Each rank has its own states: to restore every
    rank exactly, gather them (e.g. ``all_gather_object``) and save the list.
    """
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": (str(name), [int(k) for k in keys], int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `capture_rng_state`'s result; CUDA states are restored for the devices both runs have."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError naming `where` if ``torch.load(weights_only=True)`` would refuse `obj`."""
    kind = type(obj)
    if kind in _LEAVES or kind in (torch.Tensor, nn.Parameter):
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            _check_loadable(key, f"{where} (a key)")
            _check_loadable(value, f"{where}[{key!r}]")
    elif kind in _CONTAINERS:
        for index, value in enumerate(obj):
            _check_loadable(value, f"{where}[{index}]")
    else:
        raise TypeError(
            f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
            "refuses: store tensors, numbers, strings, None, and dict/list/tuple of them (e.g. .tolist(), int())"
        )


def _fsync_directory(folder: Path) -> None:
    """Make the rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
