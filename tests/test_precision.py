"""The precision option: "highest" is the exact path, float64 is never lowered, "bf16" stays within bfloat16's
rounding of the exact result, "tf32" only touches CUDA matmuls and restores the process's setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.precision import bmm, matmul_mode

BF16_EPS = 2.0**-8  # bfloat16's unit roundoff


def run(precision: str, dtype: torch.dtype, method: str = "eigen") -> tuple[list[torch.Tensor], dict[str, tuple]]:
    """Parameters after three K-FAC steps of a small conv net, and the running factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).to(dtype)
    pre = KFACPreconditioner(model, compute_method=method, precision=precision, damping=0.1, inv_dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 3, 6, 6, generator=generator, dtype=dtype)
        y = torch.randint(0, 10, (16,), generator=generator)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.1)
    return [p.detach().clone() for p in model.parameters()], pre.factors()


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_float64_is_never_lowered(method: str) -> None:
    exact, exact_factors = run("highest", torch.float64, method)
    for precision in ("tf32", "bf16"):
        params, factors = run(precision, torch.float64, method)
        assert all(torch.equal(p, q) for p, q in zip(params, exact, strict=True)), precision
        assert all(torch.equal(factors[n][0], exact_factors[n][0]) for n in factors), precision


def test_tf32_on_a_cpu_is_the_exact_path() -> None:
    exact, _ = run("highest", torch.float32)
    params, _ = run("tf32", torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(params, exact, strict=True))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_bf16_factors_and_steps_stay_within_bfloat16_rounding(method: str) -> None:
    exact, exact_factors = run("highest", torch.float32, method)
    params, factors = run("bf16", torch.float32, method)
    for name, (a, g) in factors.items():
        for low, high in ((a, exact_factors[name][0]), (g, exact_factors[name][1])):
            assert low.dtype == torch.float32  # computed from bfloat16 rows, kept in float32
            error = (low - high).norm() / high.norm()
            assert 0 < error < 8 * BF16_EPS, (name, float(error))  # lowered, and only by rounding
    for p, q in zip(params, exact, strict=True):
        assert (p - q).norm() / q.norm() < 8 * BF16_EPS


def test_bmm_rounds_bfloat16_operands_and_returns_float32() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    low = bmm(a.to(torch.bfloat16), b)
    assert low.dtype == torch.float32
    expected = torch.bmm(a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float())
    torch.testing.assert_close(low, expected, rtol=BF16_EPS, atol=1e-6)
    assert torch.equal(bmm(a, b), torch.bmm(a, b))


def test_tf32_mode_is_scoped_to_cuda_blocks_and_restored() -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with matmul_mode("tf32", torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with matmul_mode("tf32", torch.device("cpu")), matmul_mode("highest", torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_an_unknown_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="precision must be one of 'highest', 'tf32', 'bf16'; got 'fp8'"):
        KFACPreconditioner(nn.Linear(2, 2), precision="fp8")
