"""Adaptive damping (``KFACOptions.adaptive_damping``): the Levenberg-Marquardt rule with the reduction ratio.

Martens & Grosse 2015, section 6.5. After an update ``delta`` of the parameters, the quadratic model of the loss
built from K-FAC's curvature predicts the change ``M(delta) = g^T delta + 1/2 delta^T (F + d I) delta`` (g: the
raw gradient, F: the Kronecker-factored Fisher ``A (x) G`` per layer, d: the damping); the loss measured on the same
batch before and after the update changed by ``h(theta + delta) - h(theta)``. Their ratio ``rho`` says how far the
model can be trusted: ``rho > 3/4`` shrinks the damping by ``omega``, ``rho < 1/4`` (or a model that predicts no
decrease) grows it by ``1 / omega``, with ``omega = (19/20) ** T`` for an adjustment every T steps, and the
damping stays within ``[MIN_DAMPING, MAX_DAMPING]``.

Cost, on the steps where it is adjusted (factor steps): one forward pass of the batch after the optimizer's step
(the caller's), a copy of the owned layers' parameters and gradients at ``step()``, two matrix products per owned
layer and one all-reduce of four numbers.
"""

from __future__ import annotations

import torch

#: The reduction ratio above which the damping shrinks.
GOOD_RATIO = 0.75
#: The reduction ratio below which the damping grows.
POOR_RATIO = 0.25
#: Per step between two adjustments, the damping changes by this factor (Martens & Grosse's 19/20).
DECAY_PER_STEP = 19 / 20
#: The bounds the damping is kept within (kfac-dist's factor scale, docs/conventions.md).
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e8


def curvature_terms(
    delta: torch.Tensor, grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, a_diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``delta^T (A (x) G) delta``, ``|delta|^2`` and ``grad^T delta`` of one layer's ``(b, m, n)`` matrices."""
    delta = delta.to(a.dtype)
    right = delta * a.unsqueeze(1) if a_diagonal else torch.bmm(delta, a)
    curved = torch.bmm(g, right)
    return (delta * curved).sum(), delta.square().sum(), (grad.to(a.dtype) * delta).sum()


def reduction_ratio(
    loss_before: float, loss_after: float, quadratic: float, squared: float, linear: float, damping: float
) -> float:
    """``rho = (h(theta + delta) - h(theta)) / M(delta)``; 0 when the model predicts no decrease (``M >= 0``)."""
    predicted = linear + 0.5 * (quadratic + damping * squared)
    if not predicted < 0:
        return 0.0
    return (loss_after - loss_before) / predicted


def next_damping(damping: float, ratio: float, steps: int) -> float:
    """The damping after an adjustment ``steps`` steps after the last one, by the reduction ratio."""
    omega = DECAY_PER_STEP**steps
    if ratio > GOOD_RATIO:
        damping *= omega
    elif ratio < POOR_RATIO:
        damping /= omega
    return min(max(damping, MIN_DAMPING), MAX_DAMPING)
