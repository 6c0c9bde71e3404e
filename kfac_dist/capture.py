"""Accumulation of one step's factor contributions of one layer, fed by the module hooks.

Contributions of every module call and every micro-batch of a step are summed, and normalised once: A over all
rows, G over all examples (docs/conventions.md).
"""

from __future__ import annotations

import torch

from kfac_dist.layers import KFACLayer


class FactorAccumulator:
    """Sums of ``a a^T`` and ``g g^T`` of one layer during one K-FAC step."""

    def __init__(self, layer: KFACLayer) -> None:
        self.layer = layer
        self.a_sum: torch.Tensor | None = None
        self.g_sum: torch.Tensor | None = None
        self.rows = 0
        self.examples = 0
        self.pending = 0
        self._forward_pass: int | None = None

    def add_input(self, inputs: torch.Tensor, forward_pass: int, dtype: torch.dtype, precision: str) -> None:
        """Add one module call's input; its examples count once per forward pass of the model."""
        contribution, rows = self.layer.a_contribution(inputs, dtype, precision)
        self.a_sum = contribution if self.a_sum is None else self.a_sum.add_(contribution)
        self.rows += rows
        self.pending += 1
        if forward_pass != self._forward_pass:
            self.examples += self.layer.examples(inputs)
            self._forward_pass = forward_pass

    def add_output_grad(self, grad_output: torch.Tensor, dtype: torch.dtype, scale: float, precision: str) -> None:
        """Add one module call's output gradient, scaled to per-example loss gradients."""
        contribution = self.layer.g_contribution(grad_output, dtype, scale, precision)
        self.g_sum = contribution if self.g_sum is None else self.g_sum.add_(contribution)
        self.pending -= 1

    @property
    def complete(self) -> bool:
        """Whether both an input and an output gradient were captured."""
        return self.a_sum is not None and self.g_sum is not None

    def take_batch_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised batch factors ``(A, G)`` of this step; the sums are released (the counters stay).

        The caller hands them to the factor reduction, which copies them into its buckets, so a layer's
        full-square sums live only until backward finishes the layer, not until the end of the step.
        """
        assert self.a_sum is not None and self.g_sum is not None
        factors = self.a_sum / self.rows, self.g_sum / self.examples
        self.a_sum = self.g_sum = None
        return factors

    def clear(self) -> None:
        """Forget this step's contributions."""
        self.a_sum = self.g_sum = None
        self.rows = self.examples = self.pending = 0
        self._forward_pass = None
