"""A stand-in accelerator for CPU-only tests: real CPU computation on tensors that say they live on ``meta``.

    with TaggedDevice() as mode:
        model = make_model(device=DEVICE)   # factories on DEVICE ("meta") make tagged tensors with real values
        ...                                 # every operator refuses to mix tagged and untagged (CPU) tensors

Why not a fake CUDA device: ``FakeTensorMode`` makes fake CUDA tensors on a CPU-only build, and has fake
kernels for ``eigh`` and ``cholesky``, but autograd through a fake CUDA tensor aborts the process there
(``PyTorch is not linked with support for cuda devices`` from the gradient accumulator), and fake tensors have
no values, so ``.item()``, ``bool()`` and ``.tolist()`` fail. A plain ``meta`` tensor has no values either. So
the tensors here are wrapper subclasses that report ``device == meta`` (autograd runs them on the CPU queue)
and hold a real CPU tensor: the mode unwraps every operator's arguments, checks their devices, runs the
operator on the CPU and wraps the results.

Rules, stricter than CUDA's: an operator that receives both tagged and untagged tensors raises `DeviceMixError`,
0-dim CPU tensors included (CUDA accepts those as scalars; on a real device they are a host-to-device copy,
and one made from a device value costs a host sync). Factory calls with ``device=meta`` make tagged tensors;
``.to("cpu")`` makes an untagged one (an explicit move to the host is allowed); ``.item()``, ``bool()`` and
``.tolist()`` read the values and are counted in `host_syncs`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")


class DeviceMixError(AssertionError):
    """An operator received tensors on the tagged device and on the CPU."""


class Tagged(torch.Tensor):
    """A real CPU tensor (`elem`) that reports ``device == meta``; only usable inside `TaggedDevice`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> Tagged:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"Tagged({self.elem!r})"

    def tolist(self) -> Any:
        """The values, read on the host (torch has no dispatch for ``tolist`` of a subclass)."""
        TaggedDevice.count_host_sync()
        return self.elem.tolist()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(f"{func} on a tagged tensor outside TaggedDevice")


def untag(value: Any) -> Any:
    """The CPU tensor(s) inside tagged tensors (any nesting of lists, tuples and dicts); others unchanged."""
    return tree_map(lambda x: x.elem if isinstance(x, Tagged) else x, value)


def is_tagged(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives on the tagged device."""
    return isinstance(tensor, Tagged)


class TaggedDevice(TorchDispatchMode):
    """The mode that runs tagged tensors on the CPU and refuses device mixing.

    Attributes:
        host_syncs: how many times a tagged value was read on the host (``item``, ``bool``, ``tolist``).
        ops: the names of the operators that ran on tagged tensors.
    """

    _active: list[TaggedDevice] = []

    def __init__(self) -> None:
        super().__init__()
        self.host_syncs = 0
        self.ops: set[str] = set()

    def __enter__(self) -> TaggedDevice:
        TaggedDevice._active.append(self)
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        TaggedDevice._active.pop()
        super().__exit__(*exc)

    @staticmethod
    def count_host_sync() -> None:
        """Count one read of tagged values on the host in the innermost active mode."""
        TaggedDevice._active[-1].host_syncs += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tagged = [x for x in flat if isinstance(x, Tagged)]
        plain = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, Tagged)]
        if tagged and plain:
            shapes = ", ".join(str(tuple(p.shape)) for p in plain)
            raise DeviceMixError(f"{func}: tensors on {DEVICE} mixed with tensors on cpu of shapes {shapes}")
        device = kwargs.get("device")
        to_tagged = device is not None and torch.device(device) == DEVICE
        if to_tagged:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if tagged:
            self.ops.add(str(func))
        result = func(*untag(args), **untag(kwargs))
        if func is torch.ops.aten._local_scalar_dense.default:
            if tagged:
                self.host_syncs += 1
            return result
        if not (to_tagged or (tagged and device is None)):
            return result  # untagged work, or an explicit move off the tagged device
        inputs = {id(x.elem): x for x in tagged}  # in-place ops return their (tagged) input
        return tree_map(lambda t: _tag(t, inputs) if isinstance(t, torch.Tensor) else t, result)


def _tag(tensor: torch.Tensor, inputs: dict[int, Tagged]) -> torch.Tensor:
    return inputs[id(tensor)] if id(tensor) in inputs else Tagged(tensor)
