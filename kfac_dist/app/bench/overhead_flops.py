"""FLOP model of K-FAC's extra work per step versus SGD's forward + backward, layer by layer.

The model is built on the meta device (nothing is allocated) and run on a meta batch to read each preconditioned
layer's rows (examples x output locations), its factor sides ``a`` (patch [+ bias]) and ``g`` (output channels)
and its blocks, exactly as the preconditioner registers them (:func:`kfac_dist.registry.register_layers`).

Per preconditioned layer with ``R`` rows, weight ``g x a_w`` (``a_w`` = patch without the bias column):

- forward: ``2 R a_w g``; backward: twice that (input and weight gradients), once for the first layer, whose
  input needs no gradient. Layers K-FAC does not touch (BatchNorm, ReLU, pooling) are not counted: their FLOPs
  are small, though on a CPU their memory traffic is not.
- factors (factor steps): ``2 R (a^2 + g^2)``, the full Gram products ``rows^T rows`` the library computes.
- decomposition (inverse steps): eigen ``c (a^3 + g^3)`` with ``c = EIGH_FLOPS_PER_N3`` (symmetric
  eigendecomposition with eigenvectors, Golub & Van Loan's ~9 n^3); inverse ``a^3 + g^3`` (Cholesky n^3/3 and
  ``cholesky_inverse`` 2 n^3/3).
- preconditioning (every step): eigen ``4 a g (a + g)`` (four GEMMs: rotate in, rotate out), inverse
  ``2 a g (a + g)`` (``G^-1 M A^-1``).

Amortised extra FLOPs per step at frequencies ``(f, p)``: ``factors / f + decomposition / p + preconditioning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kfac_dist.models import build_model
from kfac_dist.registry import register_layers

__all__ = [
    "EIGH_FLOPS_PER_N3",
    "FLOP_CONFIGS",
    "PROXY_KWARGS",
    "LayerFlops",
    "flop_summary",
    "layer_flops",
    "ratio_table",
    "step_ratio",
]

#: FLOPs of a symmetric eigendecomposition with eigenvectors, per n^3.
EIGH_FLOPS_PER_N3 = 9.0


@dataclass(frozen=True)
class LayerFlops:
    """FLOP counts of one preconditioned layer for one batch."""

    name: str
    rows: int
    a: int
    g: int
    blocks: int
    forward: float
    backward: float
    factors: float
    eigh: float
    cholesky: float
    precondition_eigen: float
    precondition_inverse: float


def layer_flops(model_name: str, batch: int, input_shape: Sequence[int], **kwargs: Any) -> list[LayerFlops]:
    """FLOPs of every preconditioned layer of ``build_model(model_name, **kwargs)`` on a batch of ``batch``."""
    with torch.device("meta"):
        model = build_model(model_name, **kwargs)
    states, _ = register_layers(model, ())
    rows: dict[str, int] = {}

    def record(name: str, output: torch.Tensor) -> None:
        state = states[name]
        rows[name] = int(state.layer.output_rows(output).shape[1])

    handles = [
        state.layer.module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name, state in states.items()
    ]
    with torch.no_grad():
        model(torch.empty(batch, *input_shape, device="meta"))
    for handle in handles:
        handle.remove()
    result = []
    first = next(iter(states))
    for name, state in states.items():
        layer = state.layer
        a, g, blocks, r = layer.a_side, layer.g_side, layer.blocks, rows[name]
        a_weight = a - int(layer.has_bias)
        forward = 2.0 * r * a_weight * g * blocks
        a_cube = 0.0 if layer.a_diagonal else float(a) ** 3
        result.append(
            LayerFlops(
                name=name,
                rows=r,
                a=a,
                g=g,
                blocks=blocks,
                forward=forward,
                backward=forward * (1.0 if name == first else 2.0),
                factors=2.0 * r * (a * (1 if layer.a_diagonal else a) + g * g) * blocks,
                eigh=EIGH_FLOPS_PER_N3 * (a_cube + float(g) ** 3) * blocks,
                cholesky=(a_cube + float(g) ** 3) * blocks,
                precondition_eigen=4.0 * a * g * (a + g) * blocks,
                precondition_inverse=2.0 * a * g * (a + g) * blocks,
            )
        )
    return result


def flop_summary(layers: Sequence[LayerFlops]) -> dict[str, float]:
    """Totals over layers: forward + backward, and K-FAC's extra work per factor / inverse / every step."""
    return {
        "forward_backward": sum(x.forward + x.backward for x in layers),
        "factors": sum(x.factors for x in layers),
        "eigh": sum(x.eigh for x in layers),
        "cholesky": sum(x.cholesky for x in layers),
        "precondition_eigen": sum(x.precondition_eigen for x in layers),
        "precondition_inverse": sum(x.precondition_inverse for x in layers),
        "largest_side": float(max(max(x.a, x.g) for x in layers)),
    }


def step_ratio(summary: dict[str, float], factor_steps: int, inv_steps: int, method: str) -> dict[str, float]:
    """Per-step extra FLOPs of each K-FAC part relative to forward + backward, and the K-FAC / SGD FLOP ratio."""
    base = summary["forward_backward"]
    decomposition = summary["eigh"] if method == "eigen" else summary["cholesky"]
    parts = {
        "factors": summary["factors"] / factor_steps / base,
        "decomposition": decomposition / inv_steps / base,
        "preconditioning": summary[f"precondition_{method}"] / base,
    }
    return {**parts, "ratio": 1.0 + sum(parts.values())}


#: The proxy's model arguments: 1/8 width, and the classes scaled by 1/8 too (so the fc layer scales like the rest).
PROXY_KWARGS: dict[str, Any] = {"width_multiplier": 0.125, "num_classes": 125}
#: (label, model name, batch, input shape, kwargs, excluded layers) of the configurations the FLOP table compares.
FLOP_CONFIGS: tuple[tuple[str, str, int, tuple[int, ...], dict[str, Any], tuple[str, ...]], ...] = (
    ("ResNet-50, 224x224, batch 32, 1000 classes", "resnet50", 32, (3, 224, 224), {"num_classes": 1000}, ()),
    (
        "proxy: width 1/8, 32x32, batch 196, 125 classes",
        "resnet50",
        196,
        (3, 32, 32),
        PROXY_KWARGS,
        (),
    ),
    ("proxy with 1000 classes", "resnet50", 196, (3, 32, 32), {"width_multiplier": 0.125, "num_classes": 1000}, ()),
    ("ResNet-50 without the stem conv", "resnet50", 32, (3, 224, 224), {"num_classes": 1000}, ("conv1",)),
    ("proxy without the stem conv", "resnet50", 196, (3, 32, 32), PROXY_KWARGS, ("conv1",)),
)


def ratio_table(
    freqs: Sequence[tuple[int, int]], methods: Sequence[str] = ("eigen", "inverse")
) -> list[dict[str, Any]]:
    """Per configuration of :data:`FLOP_CONFIGS`: the parts per step kind and the ratio at every frequency."""
    rows = []
    for label, name, batch, shape, kwargs, excluded in FLOP_CONFIGS:
        layers = [x for x in layer_flops(name, batch, shape, **kwargs) if x.name not in excluded]
        summary = flop_summary(layers)
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
