"""Step control options: factor updates on every step of a warm-up, then every factor_update_steps; adaptive damping
by the Levenberg-Marquardt rule on the reduction ratio, the same on every rank."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.cli import main
from kfac_dist.damping import (
    DECAY_PER_STEP,
    MAX_DAMPING,
    MIN_DAMPING,
    curvature_terms,
    next_damping,
    reduction_ratio,
)

DTYPE = torch.float64


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


def test_the_levenberg_marquardt_rule() -> None:
    omega = DECAY_PER_STEP**5
    assert next_damping(1.0, 0.9, 5) == pytest.approx(omega)  # a trusted model: less damping
    assert next_damping(1.0, 0.1, 5) == pytest.approx(1 / omega)  # a poor one: more
    assert next_damping(1.0, 0.5, 5) == 1.0
    assert next_damping(MAX_DAMPING, -3.0, 1) == MAX_DAMPING and next_damping(MIN_DAMPING, 1.0, 1) == MIN_DAMPING
    assert reduction_ratio(1.0, 0.5, quadratic=1.0, squared=0.0, linear=-1.0, damping=0.0) == pytest.approx(1.0)
    assert reduction_ratio(1.0, 0.5, quadratic=4.0, squared=0.0, linear=-1.0, damping=0.0) == 0.0  # no decrease


def test_the_curvature_terms_are_the_dense_kronecker_form() -> None:
    torch.manual_seed(0)
    a, g = torch.randn(1, 4, 4, dtype=DTYPE), torch.randn(1, 3, 3, dtype=DTYPE)
    a, g = a @ a.mT, g @ g.mT
    delta, grad = torch.randn(1, 3, 4, dtype=DTYPE), torch.randn(1, 3, 4, dtype=DTYPE)
    quadratic, squared, linear = curvature_terms(delta, grad, a, g, a_diagonal=False)
    vec = delta[0].T.reshape(-1)  # column-major vec, the convention of docs/conventions.md
    assert float(quadratic) == pytest.approx(float(vec @ torch.kron(a[0], g[0]) @ vec), rel=1e-12)
    assert float(squared) == pytest.approx(float(vec @ vec)) and float(linear) == pytest.approx(
        float((grad * delta).sum())
    )
    diagonal, _, _ = curvature_terms(delta, grad, torch.diagonal(a, dim1=1, dim2=2), g, a_diagonal=True)
    dense = torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    assert float(diagonal) == pytest.approx(float(curvature_terms(delta, grad, dense, g, a_diagonal=False)[0]))


def damping_after_one_step(lr: float, world: int = 1, rank: int = 0) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    pre = KFACPreconditioner(model, adaptive_damping=True, damping=0.1, kl_clip=None, inv_dtype=DTYPE, lr=lr)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=generator, dtype=DTYPE), torch.randint(0, 3, (16,), generator=generator)
    part = slice(rank * 16 // world, (rank + 1) * 16 // world)
    loss = nn.functional.cross_entropy(model(x[part]), y[part])
    loss.backward()
    if world > 1:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
    pre.step()
    assert pre.adaptation_due
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
        after = nn.functional.cross_entropy(model(x[part]), y[part])
    return pre.adapt_damping(loss, after)


def test_a_small_step_shrinks_the_damping_and_a_wild_one_grows_it() -> None:
    omega = DECAY_PER_STEP  # one step since the start
    assert damping_after_one_step(lr=1e-4) == pytest.approx(0.1 * omega)  # the model is right to first order
    assert damping_after_one_step(lr=300.0) == pytest.approx(0.1 / omega)  # the loss went up


def test_adaptive_damping_is_collective_and_equals_one_process() -> None:
    single = damping_after_one_step(lr=1.0)
    ranks = run_multiproc(_two_rank_damping, 2, timeout=120)
    assert len(ranks) == 2 and ranks[0] == ranks[1] == pytest.approx(single, rel=1e-9)


def _two_rank_damping(rank: int, world: int) -> float:
    return damping_after_one_step(lr=1.0, world=world, rank=rank)


def test_adaptive_damping_needs_a_constant_start() -> None:
    with pytest.raises(ValueError, match="adaptive_damping starts from a constant damping"):
        KFACPreconditioner(nn.Sequential(nn.Linear(2, 2)), adaptive_damping=True, damping=lambda step: 0.1)


def test_the_training_app_adapts_the_damping_and_samples_the_fisher(tmp_path: Path) -> None:
    args = ["train", f"logging.dir={tmp_path}", "training.epochs=1", "logging.tensorboard=false"]
    kfac = ["kfac.adaptive_damping=true", "kfac.fisher=mc", "kfac.factor_update_steps=5", "kfac.inv_update_steps=5"]
    assert main([*args, *kfac]) == 0
    with (tmp_path / "metrics.csv").open() as rows:
        damping = [float(row["damping"]) for row in csv.DictReader(rows)]
    assert damping and damping[-1] != 1.0  # moved from the start value by the reduction ratios


def test_the_adapted_damping_is_saved_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pre = KFACPreconditioner(model, adaptive_damping=True, damping=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
    loss.backward()
    pre.step()
    moved = pre.adapt_damping(loss, loss + 1.0)  # the loss went up: more damping
    assert moved == pytest.approx(0.5 / DECAY_PER_STEP) and pre.damping == moved and not pre.adaptation_due
    restored = KFACPreconditioner(model, adaptive_damping=True, damping=0.5)
    restored.load_state_dict(pre.state_dict())
    assert restored.damping == moved
    with pytest.raises(RuntimeError, match="check pre.adaptation_due first"):
        restored.adapt_damping(1.0, 1.0)


def clipped_step(kl_clip: float | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One K-FAC step of a float64 MLP: the recorded KL-clip scale, the written gradient and the unclipped one."""
    grads = []
    for clip in (kl_clip, None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
        pre = KFACPreconditioner(model, lr=0.5, damping=0.1, kl_clip=clip)
        nn.functional.cross_entropy(model(torch.randn(16, 4, dtype=DTYPE)), torch.randint(0, 2, (16,))).backward()
        pre.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if clip == kl_clip:
            scale = pre.kl_clip_scale
    return scale, grads[0], grads[1]


def test_the_kl_clip_scale_is_what_scaled_the_step() -> None:
    """pre.kl_clip_scale: below 1 where the bound binds (the written gradient is the unclipped one times it)."""
    scale, written, unclipped = clipped_step(1e-6)
    assert scale is not None and 0 < float(scale) < 1
    torch.testing.assert_close(written, unclipped * scale)
    scale, written, unclipped = clipped_step(1e6)
    assert scale is not None and float(scale) == 1.0
    torch.testing.assert_close(written, unclipped)
    assert clipped_step(None)[0] is None
