"""``compute_method="eigen_warm"``: what the warm-started eigenbasis guarantees, when it refreshes, per-block results.

Sizes are even on purpose: MKL's LAPACK (eigh, QR) gives bitwise-different results for a block depending on its
16-byte alignment inside torch's batched buffer, which for odd sizes depends on the block's index in the stack; that
holds for ``eigen``'s batched eigh alike and is not what these tests are about.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.curvature import DecompositionError
from kfac_dist.methods import METHODS, Decomposition
from kfac_dist.methods.eigen import EigenMethod
from kfac_dist.methods.inverse import InverseMethod
from kfac_dist.methods.warm_eigen import WARM_TOLERANCE, WarmEigenMethod, basis_drift

WARM = WarmEigenMethod()
EIGEN = EigenMethod()


def spd(blocks: int, side: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random SPD matrices with well-separated eigenvalues ``2^0, 2^-1, ...`` and a random eigenbasis."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(blocks, side, side, generator=generator, dtype=torch.float64))
    values = 2.0 ** -torch.arange(side, dtype=torch.float64)
    return (basis * values) @ basis.mT.to(dtype)


def symmetric(blocks: int, side: int, seed: int) -> torch.Tensor:
    """Random symmetric matrices of Frobenius norm 1 per block."""
    x = torch.randn(blocks, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x + x.mT
    return x / torch.linalg.matrix_norm(x)[:, None, None]


def decompose(
    a: torch.Tensor, g: torch.Tensor, previous: Decomposition | None = None, dtype: torch.dtype = torch.float64
) -> Decomposition:
    return WARM.decompose(a, g, a_diagonal=False, damping=0.1, dtype=dtype, previous=previous)


def eigen(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype = torch.float64) -> Decomposition:
    return EIGEN.decompose(a, g, a_diagonal=False, damping=0.1, dtype=dtype)


def block(decomposition: Decomposition, index: int) -> Decomposition:
    """Block ``index`` of a stacked decomposition, as a stack of one."""
    tensors = {name: t[index : index + 1] for name, t in decomposition.tensors.items()}
    return Decomposition(decomposition.method, tensors)


def assert_equal(got: Decomposition, want: Decomposition) -> None:
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name


def test_it_is_a_compute_method() -> None:
    assert isinstance(METHODS["eigen_warm"], WarmEigenMethod)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_a_usable_previous_it_is_eigen(dtype: torch.dtype) -> None:
    a, g = spd(3, 6, 0), spd(3, 4, 1)
    want = eigen(a, g, dtype)
    inverse = InverseMethod().decompose(a, g, a_diagonal=False, damping=0.1, dtype=dtype)
    other_shape = decompose(spd(2, 6, 2), spd(2, 4, 3), dtype=dtype)
    for previous in (None, inverse, other_shape):
        got = decompose(a, g, previous, dtype)
        assert_equal(got, want)
        assert got.method == "eigen_warm"
        assert got.events == {"eigenbasis_refreshed": 0}
    diagonal_a = torch.rand(3, 6, dtype=torch.float64)
    want = EIGEN.decompose(diagonal_a, g, a_diagonal=True, damping=0.1, dtype=dtype)
    assert_equal(WARM.decompose(diagonal_a, g, a_diagonal=True, damping=0.1, dtype=dtype), want)


def test_a_small_change_keeps_the_warm_basis_within_the_guaranteed_bound() -> None:
    """Warm-started from the exact eigenbases of A, G, after ``A' = A + eps S_A`` (and G alike), per block:

    - the drift ``||offdiag(Q^T F' Q)||_F / ||F'||_F`` of the warm basis is at most ``WARM_TOLERANCE`` (no refresh);
    - its sorted eigenvalues are within ``drift ||F'||_F`` of eigh's (Hoffman-Wielandt, ``F~ = Q diag(l) Q^T``);
    - ``||P~ v - P v|| <= (drift_A ||A'||_F ||G'||_2 + drift_G ||A'||_2 ||G'||_F) / d * ||P v||`` for ``v`` any
      gradient, ``P v`` eigen's exact ``(A' (x) G' + d I)^-1 v`` and ``P~ v`` the warm one; with both drifts at most
      ``WARM_TOLERANCE`` the bound is ``WARM_TOLERANCE (||A'||_F ||G'||_2 + ||A'||_2 ||G'||_F) / d``.
    """
    a, g = spd(4, 6, 0), spd(4, 4, 1)
    previous = decompose(a, g)
    a2, g2 = a + 1e-2 * symmetric(4, 6, 2), g + 1e-2 * symmetric(4, 4, 3)
    warm = decompose(a2, g2, previous)
    assert warm.events == {"eigenbasis_refreshed": 0}
    drift_a, drift_g = basis_drift(a2, warm.tensors["q_a"]), basis_drift(g2, warm.tensors["q_g"])
    assert bool((drift_a <= WARM_TOLERANCE).all() and (drift_g <= WARM_TOLERANCE).all())
    assert bool((drift_a > 0).all() and (drift_g > 0).all())  # not eigh's basis: the test is about the warm one
    for side in ("a", "g"):  # each column stays near its previous one, with the same sign (no flips)
        overlap = previous.tensors[f"q_{side}"].mT @ warm.tensors[f"q_{side}"]
        nearest = overlap.abs().max(dim=-2)
        assert bool((nearest.values > 0.99).all()), side
        assert bool((overlap.gather(-2, nearest.indices.unsqueeze(-2)) > 0).all()), side
    for factor, drift, side in ((a2, drift_a, "a"), (g2, drift_g, "g")):
        sorted_values = warm.tensors[f"l_{side}"].sort().values
        error = torch.linalg.vector_norm(sorted_values - torch.linalg.eigvalsh(factor), dim=-1)
        assert bool((error <= drift * torch.linalg.matrix_norm(factor) * 1.0001 + 1e-14).all()), side
    exact = eigen(a2, g2)
    v = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    norm_f = torch.linalg.matrix_norm
    a_fro, a_two, g_fro, g_two = norm_f(a2), norm_f(a2, 2), norm_f(g2), norm_f(g2, 2)
    for damping in (1e-3, 1e-1, 1.0):
        want, got = EIGEN.precondition(exact, v, damping), WARM.precondition(warm, v, damping)
        relative = norm_f(got - want) / norm_f(want)
        bound = (drift_a * a_fro * g_two + drift_g * a_two * g_fro) / damping
        assert bool((relative <= bound * 1.0001 + 1e-12).all()), (relative, bound)
        assert bool((bound <= WARM_TOLERANCE * (a_fro * g_two + a_two * g_fro) / damping).all())
    assert float(relative.max()) < 1e-2  # damping 1 against ||A|| ||G|| ~ 1: the bound is not vacuous here


def test_repeated_warm_starts_converge_to_eigh() -> None:
    a, g = spd(2, 6, 5), spd(2, 4, 6)
    decomposition = decompose(a + 3e-2 * symmetric(2, 6, 7), g + 3e-2 * symmetric(2, 4, 8))
    drifts = []
    for _ in range(60):
        decomposition = decompose(a, g, decomposition)
        assert decomposition.events == {"eigenbasis_refreshed": 0}
        drifts.append(float(basis_drift(a, decomposition.tensors["q_a"]).max()))
    assert drifts[0] <= WARM_TOLERANCE and drifts[-1] < 1e-12 and drifts[-1] < drifts[0] * 1e-6
    for factor, side in ((a, "a"), (g, "g")):
        values, vectors = decomposition.tensors[f"l_{side}"], decomposition.tensors[f"q_{side}"]
        exact_values, exact_vectors = torch.linalg.eigh(factor)
        torch.testing.assert_close(values.sort().values, exact_values, rtol=0, atol=1e-12)
        # Each warm column is one of eigh's (up to sign), the one of its eigenvalue.
        overlap = (vectors.mT @ exact_vectors).abs()
        torch.testing.assert_close(overlap.max(dim=-1).values, torch.ones_like(values), rtol=0, atol=1e-10)
        nearest = (values.unsqueeze(-1) - exact_values.unsqueeze(-2)).abs().argmin(dim=-1)
        assert torch.equal(overlap.argmax(dim=-1), nearest)


def test_a_big_change_refreshes_exactly_those_blocks_with_eigh() -> None:
    a, g = spd(5, 6, 10), spd(5, 4, 11)
    previous = decompose(a, g)
    a2, g2 = a + 1e-3 * symmetric(5, 6, 12), g + 1e-3 * symmetric(5, 4, 13)
    a2[[1, 3]] = spd(2, 6, 14)  # unrelated matrices: the old basis is far from theirs
    g2[2] = spd(1, 4, 15)[0]
    assert bool((basis_drift(a2, previous.tensors["q_a"])[[1, 3]] > WARM_TOLERANCE).all())
    got, fresh = decompose(a2, g2, previous), eigen(a2, g2)
    assert got.events == {"eigenbasis_refreshed": 3}
    refreshed = {"a": [1, 3], "g": [2]}
    for side, blocks in refreshed.items():
        for name in (f"q_{side}", f"l_{side}"):
            for i in range(5):
                same = torch.equal(got.tensors[name][i], fresh.tensors[name][i])
                assert same == (i in blocks), (name, i)  # kept blocks are warm, not eigh's


def test_a_zero_factor_stays_warm_and_a_non_finite_one_raises() -> None:
    a, g = spd(2, 6, 16), spd(2, 4, 17)
    previous = decompose(a, g)
    zero = decompose(torch.zeros_like(a), g, previous)
    assert zero.events == {"eigenbasis_refreshed": 0}
    assert not bool(zero.tensors["l_a"].any())
    broken = a.clone()
    broken[1, 2, 3] = broken[1, 3, 2] = float("nan")
    with pytest.raises(DecompositionError):
        decompose(broken, g, previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_block_of_a_stack_is_decomposed_as_alone(dtype: torch.dtype) -> None:
    a, g = spd(6, 8, 20), spd(6, 4, 21)
    previous = decompose(a, g, dtype=dtype)
    a2, g2 = a + 1e-2 * symmetric(6, 8, 22), g + 1e-2 * symmetric(6, 4, 23)
    a2[[0, 4]] = 1e-3 * spd(2, 8, 24)  # a mix of refreshed and warm blocks, of different scales
    g2[3] = spd(1, 4, 25)[0]
    stacked = decompose(a2, g2, previous, dtype)
    assert stacked.events == {"eigenbasis_refreshed": 3}
    alone = [decompose(a2[i : i + 1], g2[i : i + 1], block(previous, i), dtype) for i in range(6)]
    assert sum(d.events["eigenbasis_refreshed"] for d in alone) == 3
    for i, one in enumerate(alone):
        assert_equal(one, block(stacked, i))


def test_it_trains_end_to_end() -> None:
    def run(method: str) -> tuple[list[torch.Tensor], KFACPreconditioner]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        pre = KFACPreconditioner(model, compute_method=method, inv_update_steps=1, damping=0.1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(4):
            model.zero_grad()
            model(x).square().mean().backward()
            pre.step()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            sgd.step()
        return grads, pre

    warm, pre = run("eigen_warm")
    exact, _ = run("eigen")
    assert all(bool(torch.isfinite(grad).all()) for grad in warm)
    assert torch.equal(warm[0], exact[0])  # no previous decomposition on the first step: eigen's eigh
    for got, want in zip(warm, exact, strict=True):  # later steps: warm-started, near eigen's
        assert float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)) < 0.05
    assert pre.health()["eigenbasis_refreshed"] >= 0
