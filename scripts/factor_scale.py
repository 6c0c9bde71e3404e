"""Measure the scale of K-FAC factors per layer, to express a damping from another code base in ours.

For every preconditioned layer of a model it computes, on one batch, kfac-dist's factors A and G
(docs/conventions.md) and prints the mean eigenvalue (trace / side) and the largest eigenvalue of each, the
number T of output locations, and what KAISA's damping is in our scale at that layer: KAISA's factors are
N^2 (Linear) and N^2 T^5 (Conv2d) times smaller than ours (docs/defaults.md), so its damping d acts like
``d * N^2 * T^5`` here. docs/configs.md uses the output to choose the ImageNet ResNet-50 damping.

Usage: OMP_NUM_THREADS=1 python scripts/factor_scale.py --model resnet50 --batch 32 --image-size 224 \
    --classes 1000 --kaisa-damping 0.001 [--channels 3] [--json OUT.json]

Inputs are standard-normal images with random labels and the model is at initialisation, so the numbers are
orders of magnitude, not the curvature of a trained network.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist.app.models import build_model
from kfac_dist.layers import make_layer
from kfac_dist.layers.base import KFACLayer


def top_eigenvalue(matrix: torch.Tensor, iterations: int = 100) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite matrix, by power iteration."""
    vector = torch.ones(matrix.shape[0], dtype=matrix.dtype) / matrix.shape[0] ** 0.5
    value = 0.0
    for _ in range(iterations):
        product = matrix @ vector
        value = float(product.norm())
        if value == 0.0:
            break
        vector = product / value
    return value


def measure(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> list[dict[str, Any]]:
    """One forward and backward pass; the factor statistics of every supported layer."""
    batch = inputs.shape[0]
    stats: dict[str, dict[str, Any]] = {}
    handles = []
    for name, module in model.named_modules():
        layer = make_layer(name, module) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        if not isinstance(layer, KFACLayer):
            continue

        def forward_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, layer=layer) -> None:
            a_sum, rows = layer.a_contribution(args[0].detach(), torch.float64)
            entry: dict[str, Any] = {"A": a_sum[0] / rows, "T": rows // batch}
            stats[layer.name] = entry

            def grad_hook(grad: torch.Tensor) -> None:
                entry["G"] = layer.g_contribution(grad.detach(), torch.float64, float(batch))[0] / batch

            out.register_hook(grad_hook)

        handles.append(module.register_forward_hook(forward_hook))
    F.cross_entropy(model(inputs), labels, label_smoothing=smoothing).backward()
    for handle in handles:
        handle.remove()
    results = []
    for name, entry in stats.items():
        a, g = entry["A"], entry["G"]
        results.append(
            {
                "layer": name,
                "T": entry["T"],
                "side_a": a.shape[0],
                "side_g": g.shape[0],
                "mean_eig_a": float(a.trace()) / a.shape[0],
                "mean_eig_g": float(g.trace()) / g.shape[0],
                "top_eig_a": top_eigenvalue(a),
                "top_eig_g": top_eigenvalue(g),
            }
        )
    return results


def main() -> None:
    """Parse the arguments, measure, print a table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--kaisa-damping", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=args.classes, in_channels=args.channels).train()
    inputs = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    labels = torch.randint(args.classes, (args.batch,))
    results = measure(model, inputs, labels, args.label_smoothing)
    print(f"{'layer':28s} {'T':>6s} {'mean eig A*G':>13s} {'top eig A*G':>12s} {'KAISA damping here':>19s}")
    for row in results:
        row["kaisa_damping_ours"] = args.kaisa_damping * args.batch**2 * row["T"] ** 5
        mean, top = row["mean_eig_a"] * row["mean_eig_g"], row["top_eig_a"] * row["top_eig_g"]
        print(f"{row['layer']:28s} {row['T']:6d} {mean:13.3e} {top:12.3e} {row['kaisa_damping_ours']:19.3e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "layers": results}, handle, indent=1)


if __name__ == "__main__":
    main()
