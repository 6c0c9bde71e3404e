"""fisher="mc": G from labels sampled from the model converges to the true Fisher (the GGN: softmax's
diag(p) - p p^T, Bernoulli's p (1 - p), the Gaussian's identity) and to curvlinops' type-2 factors; A and the
user's gradients are untouched; forgetting ``pre.backward`` is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from curvlinops import FisherType, KFACLinearOperator, KFACType
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.fisher import sampled_loss

DTYPE = torch.float64
SAMPLES = 20_000  # rows; the Monte Carlo error of a G entry is about 1 / sqrt(SAMPLES) of its scale


def one_mc_step(
    model: nn.Module, x: torch.Tensor, loss_kind: str, y: torch.Tensor | None = None, **options: object
) -> KFACPreconditioner:
    pre = KFACPreconditioner(model, fisher="mc", inv_dtype=DTYPE, kl_clip=None, **options)  # type: ignore[arg-type]
    out = model(x)
    loss = {
        "cross_entropy": lambda: nn.functional.cross_entropy(out, y),
        "binary_cross_entropy": lambda: nn.functional.binary_cross_entropy_with_logits(out, y),
        "mse": lambda: nn.functional.mse_loss(out, y),
    }[loss_kind]()
    pre.backward(loss, out, loss_kind, generator=torch.Generator().manual_seed(1))
    pre.step()
    return pre


def test_softmax_G_converges_to_the_expected_fisher_at_the_logits() -> None:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(5, 4)).to(DTYPE)
    other = copy.deepcopy(head)
    x = torch.randn(SAMPLES, 5, dtype=DTYPE)
    pre = one_mc_step(head, x, "cross_entropy", torch.randint(0, 4, (SAMPLES,)))
    p = torch.softmax(head(x), dim=1).detach()
    expected = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(dim=0)
    g = pre.factors()["0"][1]
    assert (g - expected).abs().max() < 3 / SAMPLES**0.5, (g, expected)
    empirical = KFACPreconditioner(other, inv_dtype=DTYPE)  # the data's random labels: another G
    nn.functional.cross_entropy(empirical.model(x), torch.randint(0, 4, (SAMPLES,))).backward()
    empirical.step()
    assert (empirical.factors()["0"][1] - expected).abs().max() > 2 * 3 / SAMPLES**0.5  # twice the MC bound


def test_bernoulli_and_gaussian_G_converge_to_their_fisher() -> None:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(5, 3)).to(DTYPE)
    x = torch.randn(SAMPLES, 5, dtype=DTYPE)
    targets = torch.rand(SAMPLES, 3, dtype=DTYPE)
    pre = one_mc_step(copy.deepcopy(head), x, "binary_cross_entropy", targets)
    p = torch.sigmoid(head(x)).detach()
    # mean over N x 3 elements: the loss's Hessian in f is diag(p (1 - p)) / 3 per example (the GGN)
    expected = torch.diag((p * (1 - p)).mean(dim=0)) / 3
    assert (pre.factors()["0"][1] - expected).abs().max() < 3 / 3 / SAMPLES**0.5
    pre = one_mc_step(copy.deepcopy(head), x, "mse", targets)
    # targets ~ N(f, 3/2 I): E[(2/3 (f - t))(2/3 (f - t))^T] = (4/9)(3/2) I = (2/3) I, the loss's Hessian in f
    assert (pre.factors()["0"][1] - torch.eye(3, dtype=DTYPE) * 2 / 3).abs().max() < 4 * (2 / 3) / SAMPLES**0.5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4)).to(DTYPE)


@pytest.mark.parametrize("loss_kind", ["cross_entropy", "binary_cross_entropy"])
def test_mc_factors_match_curvlinops_type2_in_expectation(loss_kind: str) -> None:
    """curvlinops' type-2 Fisher is the exact expectation of the MC G: 5 examples, each drawn 4,000 times.

    The binary cross-entropy averages over 4 outputs per example: G is the GGN of that mean, not 1/4 of it.
    """
    torch.manual_seed(3)
    model = _mlp()
    x = torch.randn(5, 6, dtype=DTYPE)
    if loss_kind == "cross_entropy":
        y, loss_func = torch.randint(0, 4, (5,)), nn.CrossEntropyLoss(reduction="mean")
    else:  # curvlinops takes binary targets only; type 2 does not depend on them
        y, loss_func = torch.randint(0, 2, (5, 4)).to(DTYPE), nn.BCEWithLogitsLoss(reduction="mean")
    theirs = copy.deepcopy(model)
    op = KFACLinearOperator(
        theirs,
        loss_func,
        list(theirs.parameters()),
        [(x, y)],
        fisher_type=FisherType.TYPE2,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    repeat = SAMPLES // 5
    pre = one_mc_step(model, x.repeat(repeat, 1), loss_kind, y.repeat(repeat, *[1] * (y.dim() - 1)))
    ours = pre.factors()
    for name, a in op._input_covariances.items():  # private attributes of curvlinops 3.0.1
        g = op._gradient_covariances[name]
        torch.testing.assert_close(ours[name][0], a, rtol=1e-10, atol=1e-12)  # A: the same rows
        assert (ours[name][1] - g).abs().max() < 0.05 * g.abs().max(), name


def test_the_users_gradients_and_the_a_factors_are_untouched() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6, dtype=DTYPE), torch.randint(0, 4, (16,))
    model = _mlp()
    plain = copy.deepcopy(model)
    pre = KFACPreconditioner(model, fisher="mc", inv_dtype=DTYPE)
    empirical = KFACPreconditioner(plain, inv_dtype=DTYPE)
    out = model(x)
    pre.backward(nn.functional.cross_entropy(out, y), out)
    plain_out = plain(x)
    empirical.backward(nn.functional.cross_entropy(plain_out, y), plain_out)  # empirical: just loss.backward()
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        assert mine.grad is not None and theirs.grad is not None and torch.equal(mine.grad, theirs.grad)
    pre.step()
    empirical.step()
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, empirical.factors()[name][0])
        assert not torch.equal(g, empirical.factors()[name][1])


def test_mc_without_its_backward_is_a_clear_error_and_plain_steps_need_none() -> None:
    model = _mlp()
    pre = KFACPreconditioner(model, fisher="mc", factor_update_steps=2)
    x, y = torch.randn(4, 6, dtype=DTYPE), torch.randint(0, 4, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"fisher='mc' samples .* KFACPreconditioner.backward\(loss, outputs\)"):
        pre.step()
    with pytest.raises(ValueError, match="loss_kind must be one of 'cross_entropy', 'binary_cross_entropy', 'mse'"):
        sampled_loss(model(x), "hinge", "mean")


def test_mc_trains_with_accumulation_and_keeps_the_step_count() -> None:
    torch.manual_seed(0)
    model = _mlp()
    pre = KFACPreconditioner(model, fisher="mc", accumulation_steps=2, inv_dtype=DTYPE, damping=0.1, lr=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = torch.randn(32, 6, dtype=DTYPE), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        for part in (slice(0, 16), slice(16, 32)):
            out = model(x[part])
            loss = nn.functional.cross_entropy(out, y[part]) / 2
            pre.backward(loss, out)
        pre.step()
        optimizer.step()
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(x), y)))
    assert pre.steps == 20 and losses[-1] < losses[0] - 0.1, losses
