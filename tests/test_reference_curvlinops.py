"""kfac-dist's factors (and tests/reference.py's) against curvlinops' KFACLinearOperator (independent).

Scale conventions, read from curvlinops 3.0.1 (``curvlinops/kfac.py``: ``_hook_accumulate_input_covariance``
and ``_accumulate_gradient_covariance``), for ``fisher_type=EMPIRICAL``, ``kfac_approx=EXPAND``,
``separate_weight_and_bias=False`` and a ``CrossEntropyLoss(reduction="mean")`` on 2-D logits (one loss term
per example); data = batches ``b`` of ``N_b`` examples, ``N_data = sum_b N_b``, ``S`` output locations per
example:

* input covariance ``= sum_b sum_rows a a^T / (N_data * S)`` with a trailing 1 for the bias: that is
  ``(1/R) sum_rows a a^T`` (R = N_data * S rows), i.e. **their A == our A**;
* gradient covariance ``= sum_b (N_b^2 / N_data) sum_rows go go^T`` with ``go = g / N_b`` the grad_output of
  the batch-mean loss: that is ``(1/N_data) sum_rows g g^T``, i.e. **their G == our G** (no factor of N).

So the Kronecker products agree too, and several curvlinops batches are one kfac-dist step with gradient
accumulation (A over all rows, G over all examples). Not compared: grouped convolutions (curvlinops averages
the input over channel groups and keeps one factor pair; kfac-dist keeps one pair per group), padding modes
other than zeros (curvlinops' patch extraction zero-pads), and Linear layers on >2-D inputs under
CrossEntropyLoss (curvlinops reads dim 1 as the class dim).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from curvlinops import FisherType, KFACLinearOperator, KFACType
from reference import ce_per_example, reference_layers, run_steps
from torch import Tensor, nn

from kfac_dist import KFACPreconditioner

DTYPE = torch.float64
CLASSES = 4
RTOL = 1e-10

Batch = tuple[Tensor, Tensor]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, CLASSES))


def _cnn_stride_pad_dil() -> nn.Module:  # 8x8 -> 4x4 -> 2x2
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, dilation=2, padding=2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(20, CLASSES),
    )


def _cnn_same_valid() -> nn.Module:  # 5x5 -> 5x5 -> 4x3
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same", dilation=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, (2, 3), padding="valid", bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, CLASSES),
    )


def _cnn_rect() -> nn.Module:  # 6x5 -> 3x3
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, CLASSES),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (6,)),
    "cnn_stride_pad_dil": (_cnn_stride_pad_dil, (3, 8, 8)),
    "cnn_same_valid": (_cnn_same_valid, (3, 5, 5)),
    "cnn_rect_kernel": (_cnn_rect, (2, 6, 5)),
}


def _setup(kind: str, sizes: tuple[int, ...], seed: int) -> tuple[nn.Module, list[Batch]]:
    make, shape = MODELS[kind]
    torch.manual_seed(seed)
    model = make().to(DTYPE)
    batches = [(torch.randn(n, *shape, dtype=DTYPE), torch.randint(0, CLASSES, (n,))) for n in sizes]
    return model, batches


def _curvlinops(model: nn.Module, batches: list[Batch]) -> KFACLinearOperator:
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        [p for p in model.parameters() if p.requires_grad],
        batches,
        fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        # its determinism check computes the factors, and compute_kronecker_factors() ADDS to cached factors
        # (curvlinops 3.0.1): skip the check so that the one explicit call below gives them exactly once
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    return op


def _curvlinops_factors(op: KFACLinearOperator) -> dict[str, tuple[Tensor, Tensor]]:
    # private attributes of curvlinops 3.0.1; fail loudly if a new version renames them
    a, g = op._input_covariances, op._gradient_covariances
    assert isinstance(a, dict) and isinstance(g, dict) and a.keys() == g.keys() and a
    return {name: (a[name], g[name]) for name in a}


def _assert_factors(got: dict[str, tuple[Tensor, Tensor]], theirs: dict[str, tuple[Tensor, Tensor]]) -> None:
    assert got.keys() == theirs.keys()
    for name, (a, g) in theirs.items():
        for what, mine, their in (("A", got[name][0], a), ("G", got[name][1], g)):
            label = f"{name} {what} vs curvlinops"
            assert mine.shape == their.shape, f"{label}: {tuple(mine.shape)} vs {tuple(their.shape)}"
            torch.testing.assert_close(
                mine, their, rtol=RTOL, atol=RTOL * 1e-3 * float(their.abs().max()), msg=_prefix(label)
            )


def _prefix(label: str) -> Callable[[str], str]:
    return lambda m: f"{label}: {m}"


def _library(model: nn.Module, **kw: Any) -> KFACPreconditioner:
    return KFACPreconditioner(model, kl_clip=None, inv_dtype=DTYPE, **kw)


@pytest.mark.parametrize("kind", list(MODELS))
def test_reference_factors_match_curvlinops(kind: str) -> None:
    """The hand-built reference (no kfac_dist) against a third party: validates the yardstick."""
    model, batches = _setup(kind, (5,), seed=0)
    theirs = _curvlinops_factors(_curvlinops(copy.deepcopy(model), batches))
    x, y = batches[0]
    ref = reference_layers(model, x, y, ce_per_example)
    _assert_factors({k: (r.A[0], r.G[0]) for k, r in ref.items()}, theirs)


@pytest.mark.parametrize("kind", list(MODELS))
def test_library_factors_match_curvlinops(kind: str) -> None:
    model, batches = _setup(kind, (5,), seed=1)
    theirs = _curvlinops_factors(_curvlinops(copy.deepcopy(model), batches))
    (rec,) = run_steps(model, _library(model), batches, ce_per_example)
    _assert_factors(rec.factors, theirs)


@pytest.mark.parametrize("kind", ["mlp", "cnn_stride_pad_dil"])
def test_library_accumulation_matches_curvlinops_over_several_batches(kind: str) -> None:
    """Micro-batches of 3 and 5 examples (loss / 2 each) == curvlinops over a data set of those 2 batches."""
    model, batches = _setup(kind, (3, 5), seed=2)
    theirs = _curvlinops_factors(_curvlinops(copy.deepcopy(model), batches))
    pre = _library(model, accumulation_steps=2)
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
    pre.step()
    _assert_factors(pre.factors(), theirs)


def _param_order_permutation(weight: Tensor, has_bias: bool) -> list[int]:
    """For each entry of ``[weight.flatten(), bias]`` its index in column-major ``vec([W | b])``."""
    m = weight.shape[0]
    n = weight[0].numel()
    perm = [i * m + o for o in range(m) for i in range(n)]
    if has_bias:
        perm += [n * m + o for o in range(m)]
    return perm


@pytest.mark.parametrize("kind", ["mlp", "cnn_stride_pad_dil"])
def test_library_kronecker_matrix_matches_curvlinops_dense_matrix(kind: str) -> None:
    """Through curvlinops' public matrix product only: ``KFAC @ I`` against ``blockdiag(A (x) G)``."""
    model, batches = _setup(kind, (4,), seed=3)
    op = _curvlinops(copy.deepcopy(model), batches)
    dense = op @ torch.eye(op.shape[1], dtype=DTYPE)
    (rec,) = run_steps(model, _library(model), batches, ce_per_example)
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d):
            a, g = rec.factors[name]
            perm = _param_order_permutation(mod.weight, mod.bias is not None)
            blocks.append(torch.kron(a, g)[perm][:, perm])
    mine = torch.block_diag(*blocks)
    assert mine.shape == dense.shape
    torch.testing.assert_close(mine, dense, rtol=RTOL, atol=RTOL * 1e-3 * float(dense.abs().max()))
