"""K-FAC factors against per-example empirical Fisher blocks computed with torch.func, where K-FAC is exact.

For a layer whose example has ONE row (a Linear layer on a 2-D batch, a convolution whose kernel covers the
whole padded input, a single embedding lookup), the per-example gradient is ``g a^T``, so its Fisher block
``vec(g a^T) vec(g a^T)^T = (a a^T) (x) (g g^T)`` (column-major vec of ``[W | b]``). Averaged over a batch
this equals ``A (x) G`` exactly when every example has the same ``a`` (the same input repeated, with different
labels), and K-FAC's scale convention (A over rows, G over examples) must make it so.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import (
    as_matrix,
    ce_per_example,
    gradient_matrix,
    per_example_fisher,
    reference_layers,
    run_steps,
)
from torch import Tensor, nn
from torch.func import functional_call, grad

from kfac_dist import KFACPreconditioner

DTYPE = torch.float64
RTOL = 1e-10


def _per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    """Gradient of each example's own loss, via torch.func (independent of hooks)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return ce_per_example(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    return [grad(loss)(params, x[n], y[n]) for n in range(x.shape[0])]


def _fisher_blocks(model: nn.Module, x: Tensor, y: Tensor, names: list[str]) -> dict[str, list[Tensor]]:
    """Per layer (and group): the average over examples of ``vec(M_n) vec(M_n)^T``."""
    grads = _per_example_grads(model, x, y)
    out: dict[str, list[Tensor]] = {}
    for name in names:
        mod = model.get_submodule(name)
        ms = [gradient_matrix(mod, gr[f"{name}.weight"], gr.get(f"{name}.bias")) for gr in grads]
        out[name] = [per_example_fisher([m[i] for m in ms]) for i in range(ms[0].shape[0])]
    return out


def _kfac_blocks(factors: dict[str, tuple[Tensor, Tensor]], name: str) -> list[Tensor]:
    a, g = factors[name]
    if a.dim() == 3:  # grouped convolution
        return [torch.kron(ai, gi) for ai, gi in zip(a, g, strict=True)]
    return [torch.kron(as_matrix(a), g)]


def _close(got: Tensor, exp: Tensor, what: str) -> None:
    assert got.shape == exp.shape, what
    torch.testing.assert_close(
        got, exp, rtol=RTOL, atol=RTOL * 1e-3 * float(exp.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def _conv_net(groups: int) -> nn.Module:
    # a 3x3 kernel on a 3x3 input without padding: one output location per example
    return nn.Sequential(nn.Conv2d(4, 6, 3, groups=groups), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3, bias=False)).to(
        DTYPE
    )


def _conv1d_net() -> nn.Module:
    # kernel 3, dilation 2, padding 1 on length 3: (3 + 2 - 4 - 1) + 1 = 1 output location, zeros in the patch
    return nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=1), nn.Flatten(), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)


def _embedding_net() -> nn.Module:
    return nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


MODELS = {
    "mlp": (_mlp, (4,), "float"),
    "conv2d_one_location": (lambda: _conv_net(1), (4, 3, 3), "float"),
    "conv2d_groups2_one_location": (lambda: _conv_net(2), (4, 3, 3), "float"),
    "conv1d_one_location": (_conv1d_net, (2, 3), "float"),
    "embedding_one_lookup": (_embedding_net, (1,), "index"),
}


def _setup(kind: str, n: int, repeat: bool, seed: int) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    make, shape, dtype = MODELS[kind]
    torch.manual_seed(seed)
    model = make()
    x1 = torch.randn(1, *shape, dtype=DTYPE) if dtype == "float" else torch.randint(0, 6, (1, *shape))
    x = (
        x1.expand(n, *shape).clone()
        if repeat
        else (torch.randn(n, *shape, dtype=DTYPE) if dtype == "float" else torch.randint(0, 6, (n, *shape)))
    )
    y = torch.arange(n) % 3  # different labels: the g's differ between examples
    return model, copy.deepcopy(model), x, y


def _library_factors(model: nn.Module, x: Tensor, y: Tensor, reduction: str) -> dict[str, tuple[Tensor, Tensor]]:
    pre = KFACPreconditioner(model, kl_clip=None, inv_dtype=DTYPE, loss_reduction=reduction)
    (rec,) = run_steps(model, pre, [(x, y)], ce_per_example, reduction)
    return rec.factors


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_single_example_kfac_is_the_per_example_fisher(kind: str, reduction: str) -> None:
    model, fisher_model, x, y = _setup(kind, 1, repeat=False, seed=0)
    factors = _library_factors(model, x, y, reduction)
    names = list(factors)
    assert len(names) == 2
    fisher = _fisher_blocks(fisher_model, x, y, names)
    for name in names:
        blocks = _kfac_blocks(factors, name)
        assert len(blocks) == len(fisher[name])
        for i, (kb, fb) in enumerate(zip(blocks, fisher[name], strict=True)):
            assert float(fb.abs().max()) > 1e-6, "degenerate test: zero Fisher block"
            _close(kb, fb, f"{name} group {i}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_repeated_input_batch_kfac_is_the_average_per_example_fisher(kind: str, reduction: str) -> None:
    model, fisher_model, x, y = _setup(kind, 6, repeat=True, seed=1)
    factors = _library_factors(model, x, y, reduction)
    fisher = _fisher_blocks(fisher_model, x, y, list(factors))
    for name in factors:
        for i, (kb, fb) in enumerate(zip(_kfac_blocks(factors, name), fisher[name], strict=True)):
            _close(kb, fb, f"{name} group {i}")


@pytest.mark.parametrize("kind", list(MODELS))
def test_reference_factors_give_the_per_example_fisher(kind: str) -> None:
    """The hand-built reference (no kfac_dist) satisfies the same identity: it is a valid yardstick."""
    model, _, x, y = _setup(kind, 5, repeat=True, seed=2)
    ref = reference_layers(model, x, y, ce_per_example)
    fisher = _fisher_blocks(model, x, y, list(ref))
    for name, layer in ref.items():
        for i in range(layer.A.shape[0]):
            _close(torch.kron(layer.A[i], layer.G[i]), fisher[name][i], f"{name} group {i}")


def test_distinct_inputs_are_not_exact_so_the_comparison_can_fail() -> None:
    """Sanity check of the test itself: with distinct inputs the identity fails (K-FAC approximates)."""
    model, fisher_model, x, y = _setup("mlp", 6, repeat=False, seed=3)
    factors = _library_factors(model, x, y, "mean")
    fisher = _fisher_blocks(fisher_model, x, y, list(factors))
    (kb,) = _kfac_blocks(factors, "0")
    assert float((kb - fisher["0"][0]).abs().max()) > 1e-3 * float(fisher["0"][0].abs().max())
