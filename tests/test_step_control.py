"""Step control options: factor updates on every step of a warm-up, then every factor_update_steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner


def factor_steps(**options: int) -> list[int]:
    """The steps on which the running factors changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pre = KFACPreconditioner(model, **options)  # type: ignore[arg-type]
    changed, last = [], None
    for step in range(12):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
        pre.step()
        now = pre.factors()["0"][0].clone()
        if last is None or not torch.equal(now, last):
            changed.append(step)
        last = now
    return changed


def test_factors_update_on_every_warm_up_step_then_on_the_period() -> None:
    assert factor_steps(factor_update_steps=5) == [0, 5, 10]
    assert factor_steps(factor_update_steps=5, factor_warmup_steps=3) == [0, 1, 2, 5, 10]
    assert factor_steps(factor_update_steps=5, factor_warmup_steps=7) == [0, 1, 2, 3, 4, 5, 6, 10]


def test_a_negative_warm_up_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"factor_warmup_steps must be an integer in \[0, inf\); got -1"):
        KFACPreconditioner(nn.Linear(2, 2), factor_warmup_steps=-1)
