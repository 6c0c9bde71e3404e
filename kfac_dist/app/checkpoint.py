"""Checkpoints: one file per save, written atomically by one process, loaded without running any code.

A checkpoint is ``<directory>/ckpt-epoch{epoch:04d}-step{step:08d}.pt``, a `torch.save` of the dict

    {"format": "kfac-dist-checkpoint", "version": 2, "epoch": int, "step": int, "meta": {str: str},
     "sha256": str, "state": {...}}

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
- ``sha256`` is a digest of the content (epoch, step, meta and state: every key, value and tensor's dtype, shape and
  bytes; see `content_digest`), computed before writing and stored in the same file, so it is written atomically
  with it. A state holding a non-finite floating-point tensor is never written (`first_nonfinite`).
- Loading checks, in this order, and says which check failed (`CheckpointError` subclasses):
  1. the zip archive: every record's CRC-32 (``torch.load`` does not check them) -> `CheckpointDamaged`;
  2. ``torch.load(path, map_location="cpu", weights_only=True)``: with intact records, a refusal means pickled
     objects of other classes -> `CheckpointUnsafe`, and none of their code runs;
  3. the format and the version -> `CheckpointError`; the content digest (version 2) -> `CheckpointDamaged`;
  4. that no floating-point tensor is non-finite (e.g. a checkpoint written by an older kfac-dist after the loss
     diverged) -> `CheckpointDamaged`.
  Version 1 checkpoints (written before the digest) are accepted: they are verified by their zip CRCs only.
- `load_latest_usable` tries the newest checkpoint first and falls back to the previous one, reporting each file it
  passes over in one line (``checkpoint.resume: auto``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointWriteError",
    "CheckpointUnsafe",
    "capture_rng_state",
    "checkpoint_name",
    "content_digest",
    "first_nonfinite",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_usable",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "kfac-dist-checkpoint"
VERSION = 2
#: Versions this code reads; version 1 has no content digest.
READABLE_VERSIONS = (1, 2)
_NAME = re.compile(r"ckpt-epoch(\d+)-step(\d+)\.pt")
_TEMP = re.compile(r"\.ckpt-epoch\d+-step\d+\.pt\..*\.tmp")
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: damaged, not a kfac-dist checkpoint, or holding disallowed objects."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint file is damaged: truncated, a zip or CRC error, a content digest mismatch, non-finite values."""


class CheckpointUnsafe(CheckpointError):
    """An intact checkpoint file holds pickled objects that ``weights_only`` loading refuses (none of them ran)."""


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with another model or configuration."""


class CheckpointWriteError(OSError):
    """A save failed (disk full, no permission, I/O error); the checkpoints already in the directory are intact.

    ``errno`` is that of the failed system call; the message names the directory.
    """

    def __init__(self, folder: Path, cause: OSError) -> None:
        reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno is not None else str(cause)
        message = f"cannot write a checkpoint in {folder}: {reason}; the checkpoints already there are intact"
        super().__init__(cause.errno, message)
        self.folder = folder

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised from or during (torch.save wraps write errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


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
    (epoch, step). As a state with non-finite values is never written, the newest checkpoint is always finite.
    Call it on one rank only.

    Raises:
        ValueError: `epoch` or `step` < 0, `keep` < 1, `meta` not a dict of strings, or a floating-point tensor
            of `state` is not finite (the message names its key; nothing is written or pruned).
        TypeError: `state` holds something ``weights_only`` loading refuses; the message names its key.
        CheckpointWriteError: The directory or file cannot be written (e.g. a full disk); nothing was renamed or
            pruned, so the checkpoints already there are intact.
    """
    for name, value, low in (("epoch", epoch, 0), ("step", step, 0), ("keep", keep, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"save_checkpoint: {name}={value!r} must be an integer >= {low}")
    meta = dict(meta or {})
    bad_meta = [key for key, value in meta.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad_meta:
        raise ValueError(f"save_checkpoint: meta fields must map strings to strings; not so for {bad_meta}")
    state = dict(state)
    _check_loadable(state, "state")
    nonfinite = first_nonfinite(state)
    if nonfinite is not None:
        raise ValueError(f"save_checkpoint: state{nonfinite} is not finite; a checkpoint with NaN/Inf is never written")
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointWriteError(folder, error) from error
    final = folder / checkpoint_name(epoch, step)
    digest = content_digest(epoch, step, meta, state)
    payload = {"format": FORMAT, "version": VERSION, "epoch": epoch, "step": step, "meta": meta, "sha256": digest}
    payload["state"] = state
    try:
        fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as error:
        raise CheckpointWriteError(folder, error) from error
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is not None:  # a full disk, an I/O error: nothing was renamed, the old checkpoints stand
            raise CheckpointWriteError(folder, cause) from error
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
        The saved dict: ``epoch``, ``step``, ``meta``, ``state`` (and ``format``, ``version``, ``sha256``).

    Raises:
        FileNotFoundError: No file at `path`.
        CheckpointDamaged: The file is truncated, fails its zip or CRC checks, its content does not match its
            digest, or it holds non-finite values; the message names the path and what is wrong.
        CheckpointUnsafe: The file is intact but holds objects that ``weights_only`` loading refuses (none of
            their code runs).
        CheckpointError: The file is not a kfac-dist checkpoint, or of a version this code does not read.
        CheckpointMismatch: An identity field differs; the message names each field and both values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the records are intact (CRC-checked): the pickle asks for more
        raise CheckpointUnsafe(
            f"unsafe content in checkpoint {path}: it holds objects other than tensors and plain containers "
            f"({_refusal(error)}); refused without running any of it (checkpoints load with weights_only=True)"
        ) from error
    except Exception as error:
        raise CheckpointDamaged(f"damaged checkpoint {path}: torch.load failed ({_first_sentence(error)})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kfac-dist checkpoint (no format={FORMAT!r} field)")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this code reads {READABLE_VERSIONS}")
    if version >= 2:
        digest = content_digest(payload.get("epoch"), payload.get("step"), payload.get("meta"), payload.get("state"))
        if payload.get("sha256") != digest:
            raise CheckpointDamaged(f"damaged checkpoint {path}: its content does not match its sha256 digest")
    nonfinite = first_nonfinite(payload.get("state"))
    if nonfinite is not None:
        raise CheckpointDamaged(f"unusable checkpoint {path}: state{nonfinite} holds non-finite values (NaN/Inf)")
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


def load_latest_usable(
    directory: str | os.PathLike[str], *, report: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint in `directory` that passes `load_checkpoint`'s checks, or None if there is none.

    A file that fails them (`CheckpointError`: damaged, unsafe, not a checkpoint) is passed over with one line
    to `report` naming it and what is wrong, and the previous one is tried; version 1 files are reported as
    unverified. Identity checks are the caller's, on the returned payload.

    Raises:
        CheckpointError: Checkpoints exist but none is usable (each was reported).
    """
    candidates = list_checkpoints(directory)
    for path in reversed(candidates):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as error:
            report(f"checkpoint.resume=auto: skipping {error}; trying the previous checkpoint")
            continue
        if payload["version"] < 2:
            report(f"checkpoint.resume=auto: {path} predates content digests (version 1): verified by zip CRCs only")
        return path, payload
    if candidates:
        raise CheckpointDamaged(
            f"checkpoint.resume=auto: none of the {len(candidates)} checkpoints in {directory} is "
            "usable (each is reported above); set checkpoint.resume=none to start afresh"
        )
    return None


def content_digest(epoch: Any, step: Any, meta: Any, state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: every key and value, and each tensor's dtype, shape and bytes.

    It depends only on the values, not on how `torch.save` laid them out, so it is computed before writing and
    checked after loading.
    """
    digest = hashlib.sha256()
    for chunk in _content_bytes([epoch, step, meta, state]):
        digest.update(chunk)
    return digest.hexdigest()


def first_nonfinite(state: Any, where: str = "") -> str | None:
    """The key path (e.g. ``['model']['fc.weight']``) of the first NaN/Inf floating-point tensor in `state`, or None.

    Reads every such tensor (a device sync on CUDA).
    """
    if isinstance(state, torch.Tensor):
        floating = state.is_floating_point() or state.is_complex()
        return where if floating and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


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


def _content_bytes(obj: Any) -> Iterator[bytes | memoryview]:
    """A canonical byte encoding of a ``weights_only``-loadable value (what `content_digest` hashes)."""
    if isinstance(obj, torch.Tensor):
        yield f"T{obj.dtype}{tuple(obj.shape)}:".encode()
        flat = obj.detach().to("cpu").contiguous().reshape(-1)
        yield flat.view(torch.uint8).numpy().data if flat.numel() else b""  # a view: no copy on the CPU
    elif isinstance(obj, bytes):
        yield b"B%d:" % len(obj)
        yield obj
    elif isinstance(obj, Mapping):
        yield b"D%d:" % len(obj)
        for key, value in obj.items():
            yield from _content_bytes(key)
            yield from _content_bytes(value)
    elif type(obj) in (list, tuple):
        yield b"L%d:" % len(obj) if type(obj) is list else b"U%d:" % len(obj)
        for value in obj:
            yield from _content_bytes(value)
    elif isinstance(obj, (set, frozenset)):
        yield f"S{sorted(repr(value) for value in obj)}".encode()
    else:  # None, bool, int, float, complex, str, torch.Size / dtype / device: repr is exact and stable
        yield f"V{type(obj).__name__}:{obj!r};".encode()


def _check_archive(path: Path) -> None:
    """Raise `CheckpointDamaged` unless `path` is a zip archive whose records all match their CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as error:  # BadZipFile, a garbled header (UnicodeDecodeError, struct.error), EOF, ...
        raise CheckpointDamaged(
            f"damaged checkpoint {path}: not a readable zip archive ({_first_sentence(error)})"
        ) from error
    if bad is not None:
        raise CheckpointDamaged(f"damaged checkpoint {path}: record {bad} fails its CRC-32 check")


def _refusal(error: Exception) -> str:
    """What ``weights_only`` loading refused, without torch's advice to load unsafely."""
    text = str(error)
    found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", text)
    if found is not None:
        return f"it would call {found.group(1).rstrip('.,')}"
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    return found.group(1) if found is not None else "refused by the weights-only unpickler"


def _first_sentence(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".split(". ")[0].splitlines()[0]


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
