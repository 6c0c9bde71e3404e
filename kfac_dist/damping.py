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

from collections.abc import Iterable, Mapping

import torch

from kfac_dist.comm import Communicator
from kfac_dist.registry import LayerState

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


class DampingAdapter:
    """Adaptive damping's state: the current damping, the step it last moved, and the last step's probe.

    The probe is taken at ``step()`` on factor steps (the raw gradient matrix and a copy of the parameters of each
    layer this rank owns factors of) and consumed by :meth:`adapt` after the optimizer's step.
    """

    def __init__(self, damping: float, device: torch.device) -> None:
        self.damping = damping
        self.device = device
        self.adjusted_at: int | None = None
        self.probe: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] | None = None

    def take_probe(self, owned: Iterable[LayerState]) -> None:
        """Keep the raw gradients and parameters of the owned layers that have factors and gradients."""
        self.probe = {
            state.name: (state.layer.grad_matrix().clone(), [p.detach().clone() for p in state.layer.parameters()])
            for state in owned
            if state.a is not None and state.layer.has_grad()
        }

    def adapt(
        self,
        states: Mapping[str, LayerState],
        loss_before: float | torch.Tensor,
        loss_after: float | torch.Tensor,
        comm: Communicator,
        step: int,
    ) -> float:
        """The new damping from the probe, the parameters now and the two losses (collective); see the module."""
        assert self.probe is not None
        probe, self.probe = self.probe, None
        terms = torch.zeros(5, dtype=torch.float64, device=self.device)
        for name, (grad, before) in probe.items():
            state = states[name]
            assert state.a is not None and state.g is not None
            delta = _update_matrix(state, before)
            quadratic, squared, linear = curvature_terms(delta, grad, state.a, state.g, state.layer.a_diagonal)
            terms[:3] += torch.stack([quadratic, squared, linear]).to(torch.float64)
        terms[3], terms[4] = (_number(loss_before), _number(loss_after))
        comm.allreduce(terms, average=False, category="damping").wait()
        quadratic, squared, linear, before_sum, after_sum = terms.tolist()
        world = comm.world_size
        ratio = reduction_ratio(before_sum / world, after_sum / world, quadratic, squared, linear, self.damping)
        since = step - self.adjusted_at if self.adjusted_at is not None else 1
        self.damping = next_damping(self.damping, ratio, max(since, 1))
        self.adjusted_at = step
        return self.damping


def _number(value: float | torch.Tensor) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _update_matrix(state: LayerState, before: list[torch.Tensor]) -> torch.Tensor:
    """The layer's update ``parameters now - before`` as its ``(b, m, n)`` matrix (through its gradient layout)."""
    params = state.layer.parameters()
    kept = [p.grad for p in params]
    for param, old in zip(params, before, strict=True):
        param.grad = param.detach() - old
    try:
        return state.layer.grad_matrix().clone()
    finally:
        for param, grad in zip(params, kept, strict=True):
            param.grad = grad
