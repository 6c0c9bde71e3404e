"""Smoke: on real MNIST-5k digits, K-FAC reaches a lower training loss than tuned SGD in the same steps."""

from __future__ import annotations

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.data.mnist import load_mnist_5k
from kfac_dist.app.models import build_model

STEPS = 100
BATCH = 64


def training_loss(lr: float, momentum: float, kfac: dict[str, float] | None) -> float:
    """Full-training-split loss after ``STEPS`` steps on the same seeded batches."""
    torch.manual_seed(0)
    train, _ = load_mnist_5k()
    model = build_model("small_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    pre = KFACPreconditioner(model, lr=lr, inv_update_steps=5, **kfac) if kfac is not None else None
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        index = torch.randint(0, len(train.labels), (BATCH,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.images[index]), train.labels[index]).backward()
        if pre is not None:
            pre.step()
        optimizer.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(train.images), train.labels).item()


def test_kfac_beats_tuned_sgd_on_mnist_5k() -> None:
    sgd = {lr: training_loss(lr, 0.9, None) for lr in (0.01, 0.03, 0.1)}
    kfac = training_loss(0.1, 0.0, {"damping": 0.3, "kl_clip": 0.1})
    best_sgd = min(sgd.values())
    print(f"MNIST-5k small CNN, {STEPS} steps: K-FAC loss {kfac:.4f}, SGD losses {sgd}")
    assert kfac < 0.8 * best_sgd, f"K-FAC {kfac:.4f} vs best SGD {best_sgd:.4f} ({sgd})"
