"""Which Fisher the G factors estimate (``KFACOptions.fisher``) and the sampled losses of the true Fisher.

- ``"empirical"``: G is made of the gradients of the user's loss with the data's labels (the empirical Fisher).
- ``"mc"``: G is made of the gradients of the same loss against labels drawn from the model's own predictive
  distribution (the true Fisher, one Monte Carlo sample per example: Martens & Grosse 2015; kfac-jax's default),
  computed by one extra backward pass on factor steps that leaves the parameters' gradients untouched
  (``KFACPreconditioner.backward``). In expectation over the draws G is then the generalised Gauss-Newton's:
  for a softmax output, ``J^T (diag(p) - p p^T) J``.

:func:`sampled_loss` draws the labels for each loss kind (:data:`LOSS_KINDS`), matching the likelihood whose negative
log is that loss:

- ``"cross_entropy"`` (``F.cross_entropy`` of logits, classes along dim 1): labels ~ Categorical(softmax);
- ``"binary_cross_entropy"`` (``F.binary_cross_entropy_with_logits``): targets ~ Bernoulli(sigmoid);
- ``"mse"`` (``F.mse_loss``): targets ~ N(f, s^2 I) with ``s^2 = D / 2``.

D is the number of loss terms the ``reduction="mean"`` loss averages over per example (output elements; for the
cross-entropy, positions: elements over classes; 1 for ``"sum"``). Averaging over D terms scales the loss's Hessian
in f by ``1 / D`` but the outer product of its sampled gradients by ``1 / D^2``; so the cross-entropies' sampled
loss is multiplied by ``sqrt(D)`` and the Gaussian's variance is ``D / 2``: in expectation G is the generalised
Gauss-Newton of the user's loss, as curvlinops' ``KFACLinearOperator(fisher_type="mc")`` defines it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FISHERS = ("empirical", "mc")
LOSS_KINDS = ("cross_entropy", "binary_cross_entropy", "mse")


def sampled_loss(
    outputs: torch.Tensor, kind: str, reduction: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The ``kind`` loss of ``outputs`` against targets drawn from the model's predictive distribution.

    The targets carry no gradient; ``reduction`` is the user's (``"mean"`` over examples, or ``"sum"``).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {', '.join(map(repr, LOSS_KINDS))}; got {kind!r}")
    terms = _terms_per_example(outputs, kind, reduction)
    with torch.no_grad():
        detached = outputs.detach().float()
        if kind == "cross_entropy":
            probs = torch.softmax(detached, dim=1).movedim(1, -1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            labels = drawn.view(probs.shape[:-1])
        elif kind == "binary_cross_entropy":
            targets = torch.bernoulli(torch.sigmoid(detached), generator=generator).to(outputs.dtype)
        else:
            noise = torch.randn(detached.shape, generator=generator, device=detached.device)
            targets = (detached + noise * (terms / 2) ** 0.5).to(outputs.dtype)
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, labels, reduction=reduction) * terms**0.5
    if kind == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction=reduction) * terms**0.5
    return F.mse_loss(outputs, targets, reduction=reduction)


def _terms_per_example(outputs: torch.Tensor, kind: str, reduction: str) -> int:
    """D: the loss terms a ``"mean"`` loss averages over per example (1 for ``"sum"`` or 1-d outputs)."""
    if reduction != "mean" or outputs.dim() < 2:
        return 1
    elements = outputs[0].numel()
    return elements // outputs.shape[1] if kind == "cross_entropy" else elements
