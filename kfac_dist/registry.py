"""Which modules of a model K-FAC preconditions, and what the preconditioner keeps for each of them."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from kfac_dist.capture import FactorAccumulator
from kfac_dist.layers import LAYER_TYPES, KFACLayer, has_trainable_parameters, make_layer
from kfac_dist.methods import Decomposition
from kfac_dist.placement import LayerShape
from kfac_dist.report import Report


@dataclass
class LayerState:
    """Everything the preconditioner keeps for one layer on this rank."""

    layer: KFACLayer
    accumulator: FactorAccumulator
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    decomposition: Decomposition | None = None
    fired: bool = False
    sent: bool = False
    logged: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        """The module's qualified name."""
        return self.layer.name

    def shape(self) -> LayerShape:
        """The layer as placement sees it."""
        layer = self.layer
        return LayerShape(
            layer.name,
            layer.a_side,
            layer.g_side,
            grad_numel=layer.grad_numel,
            blocks=layer.blocks,
            a_diagonal=layer.a_diagonal,
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def register_layers(model: nn.Module, skip_layers: tuple[str, ...]) -> tuple[dict[str, LayerState], Report]:
    """Sort every trainable module into preconditioned, skipped (by pattern) or unsupported.

    Raises:
        ValueError: if nothing can be preconditioned.
    """
    states: dict[str, LayerState] = {}
    report = Report()
    for name, module in model.named_modules():
        if not has_trainable_parameters(module):
            continue
        kind = type(module).__name__
        pattern = next((p for p in skip_layers if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(kind, p)), None)
        if pattern is not None:
            report.skipped[name] = pattern
            continue
        layer = make_layer(name, module)
        if isinstance(layer, str):
            report.unsupported[name] = layer
            continue
        states[name] = LayerState(layer, FactorAccumulator(layer))
    if not states:
        raise ValueError(
            "the model has no module K-FAC can precondition "
            f"(supported: {', '.join(t.__name__ for t in LAYER_TYPES)}; see kfac_dist.register_layer_type); "
            f"skipped: {sorted(report.skipped) or 'none'}, unsupported: {sorted(report.unsupported) or 'none'}"
        )
    return states, report


def common_dtype(states: dict[str, LayerState], option: str) -> torch.dtype:
    """The one dtype of every preconditioned weight (collectives are fused per dtype)."""
    dtypes = {s.layer.parameters()[0].dtype for s in states.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{option}: preconditioned layers have mixed weight dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def describe_shapes(shapes: list[LayerShape]) -> list[str]:
    """One comparable line per layer, used to check that every rank registered the same layers."""
    return [f"{s.name}: a_side={s.a_side} g_side={s.g_side} blocks={s.blocks} diag={s.a_diagonal}" for s in shapes]


def first_difference(gathered: list[str]) -> str | None:
    """The first rank whose layer list differs from rank 0's, and where, as a message; None when all agree.

    ``gathered`` holds one newline-joined :func:`describe_shapes` list per rank, indexed by rank.
    """
    reference = gathered[0].split("\n")
    for rank, text in enumerate(gathered):
        mine = text.split("\n")
        if mine == reference:
            continue
        pairs = zip(mine, reference, strict=False)
        index = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(mine), len(reference)))
        got = mine[index] if index < len(mine) else "no such layer"
        expected = reference[index] if index < len(reference) else "no such layer"
        return (
            f"rank {rank}'s model differs from rank 0's at preconditioned layer #{index}: "
            f"rank {rank} has [{got}], rank 0 has [{expected}]"
        )
    return None
