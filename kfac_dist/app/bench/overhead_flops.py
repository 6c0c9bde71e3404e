"""FLOP model of K-FAC's extra work per step versus SGD's forward + backward, layer by layer.

The model is built on the meta device (nothing is allocated) and run on a meta batch to read each preconditioned
layer's rows (examples x output locations) as the preconditioner registers it (:func:`model_layers`). K-FAC's parts
come from :func:`kfac_dist.work.layer_work` (the Gram products of the factors; the decomposition and preconditioning
FLOPs of each compute method, :data:`kfac_dist.methods.METHODS`). A layer's forward is ``2 R`` times its weight's
elements (``R`` rows per block); its backward twice that (input and weight gradients), once for the first layer,
whose input needs no gradient. Layers K-FAC does not touch (BatchNorm, ReLU, pooling) are not counted: their FLOPs
are small, though on a CPU their memory traffic is not.

Amortised extra FLOPs per step at frequencies ``(f, p)``: ``factors / f + decomposition / p + preconditioning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfac_dist.app.bench.common import PROXY, ModelSpec
from kfac_dist.placement import LayerShape
from kfac_dist.registry import register_layers
from kfac_dist.work import layer_work

__all__ = ["FLOP_CONFIGS", "Layer", "flop_summary", "model_layers", "ratio_table", "step_ratio"]

#: The FLOP table's decomposition column of each compute method (the report's names for them).
DECOMPOSITION_COLUMNS = {"eigen": "eigh", "inverse": "cholesky"}


@dataclass(frozen=True)
class Layer:
    """A preconditioned layer on a batch.

    Its shape, rows per block, whether its rows are unfolded, its weight's elements, and whether it is the model's
    first layer (whose input needs no gradient).
    """

    shape: LayerShape
    rows: int
    unfold: bool
    weight_numel: int
    first: bool


def _unfolds(module: nn.Module) -> bool:
    """Whether kfac_dist takes the module's A rows through ``F.unfold`` (a convolution with a kernel > 1x1)."""
    return isinstance(module, nn.Conv1d | nn.Conv2d) and any(k > 1 for k in module.kernel_size)


def model_layers(spec: ModelSpec, batch: int) -> list[Layer]:
    """The preconditioned layers of `spec` (in registration order) on a batch of `batch` (meta device)."""
    model = spec.build_meta()
    states, _ = register_layers(model, ())
    rows: dict[str, int] = {}
    handles = [
        state.layer.module.register_forward_hook(
            lambda _m, _i, out, name=name: rows.__setitem__(name, int(states[name].layer.output_rows(out).shape[1]))
        )
        for name, state in states.items()
    ]
    with torch.no_grad():
        model(torch.empty(batch, *spec.input_shape, device="meta"))
    for handle in handles:
        handle.remove()
    modules = [(name, state.layer.module) for name, state in states.items()]
    weights = {n: m.weight for n, m in modules if isinstance(m.weight, torch.Tensor)}
    return [
        Layer(states[n].shape(), rows[n], _unfolds(m), weights[n].numel(), i == 0) for i, (n, m) in enumerate(modules)
    ]


def flop_summary(layers: Sequence[Layer]) -> dict[str, float]:
    """Totals over layers: forward + backward, and K-FAC's extra work per factor / inverse / every step."""
    parts = {
        "factors": [layer_work(x.shape, "factor_computation", method="eigen", rows=x.rows).gemm_flops for x in layers]
    }
    for method, column in DECOMPOSITION_COLUMNS.items():
        parts[column] = [layer_work(x.shape, "decomposition", method=method).decomposition_flops for x in layers]
        parts[f"precondition_{method}"] = [
            layer_work(x.shape, "preconditioning", method=method).gemm_flops for x in layers
        ]
    return {
        "forward_backward": sum(2.0 * x.rows * x.weight_numel * (2.0 if x.first else 3.0) for x in layers),
        **{name: sum(values) for name, values in parts.items()},
        "largest_side": float(max(max(x.shape.a_side, x.shape.g_side) for x in layers)),
    }


def step_ratio(summary: dict[str, float], factor_steps: int, inv_steps: int, method: str) -> dict[str, float]:
    """Per-step extra FLOPs of each K-FAC part relative to forward + backward, and the K-FAC / SGD FLOP ratio."""
    base = summary["forward_backward"]
    decomposition = summary[DECOMPOSITION_COLUMNS[method]]
    parts = {
        "factors": summary["factors"] / factor_steps / base,
        "decomposition": decomposition / inv_steps / base,
        "preconditioning": summary[f"precondition_{method}"] / base,
    }
    return {**parts, "ratio": 1.0 + sum(parts.values())}


_RESNET50 = ModelSpec("resnet50", {"num_classes": 1000}, (3, 224, 224))
#: (label, model, batch, excluded layers) of the configurations the FLOP table compares.
FLOP_CONFIGS: tuple[tuple[str, ModelSpec, int, tuple[str, ...]], ...] = (
    ("ResNet-50, 224x224, batch 32, 1000 classes", _RESNET50, 32, ()),
    ("proxy: width 1/8, 32x32, batch 196, 125 classes", PROXY, 196, ()),
    ("proxy with 1000 classes", ModelSpec("resnet50", {"width_multiplier": 0.125, "num_classes": 1000}), 196, ()),
    ("ResNet-50 without the stem conv", _RESNET50, 32, ("conv1",)),
    ("proxy without the stem conv", PROXY, 196, ("conv1",)),
)


def ratio_table(
    freqs: Sequence[tuple[int, int]], methods: Sequence[str] = ("eigen", "inverse")
) -> list[dict[str, Any]]:
    """Per configuration of :data:`FLOP_CONFIGS`: the parts per step kind and the ratio at every frequency."""
    rows = []
    for label, spec, batch, excluded in FLOP_CONFIGS:
        summary = flop_summary([x for x in model_layers(spec, batch) if x.shape.name not in excluded])
        base = summary["forward_backward"]
        rows.append(
            {
                "config": label,
                "forward_backward_gflop": base / 1e9,
                "largest_side": int(summary["largest_side"]),
                "per_factor_step": {"factors": summary["factors"] / base},
                "per_inverse_step": {"eigh": summary["eigh"] / base, "cholesky": summary["cholesky"] / base},
                "per_step": {m: summary[f"precondition_{m}"] / base for m in ("eigen", "inverse")},
                "ratios": {f"{f},{p}": {m: step_ratio(summary, f, p, m)["ratio"] for m in methods} for f, p in freqs},
            }
        )
    return rows
