"""K-FAC's central claim: its update is invariant to affine reparameterisations of hidden activations."""

from __future__ import annotations

import torch
from torch import nn

from kfac_dist import KFACPreconditioner


class FixedAffine(nn.Module):
    """``a' = scale * a + shift``, elementwise, not trainable."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def make_pair(hidden: int = 3) -> tuple[nn.Sequential, nn.Sequential]:
    """Two networks computing the same function; the second sees its hidden activations affinely transformed."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, hidden), nn.Linear(hidden, 5)
    scale = torch.tensor([2.0, 0.5, -3.0])[:hidden]
    shift = torch.tensor([1.0, -2.0, 0.25])[:hidden]
    plain = nn.Sequential(first, nn.Tanh(), nn.Identity(), second)
    first_copy, second_copy = nn.Linear(4, hidden), nn.Linear(hidden, 5)
    first_copy.load_state_dict(first.state_dict())
    with torch.no_grad():  # W' a' + b' = W a + b  with  a' = scale * a + shift
        second_copy.weight.copy_(second.weight / scale)
        second_copy.bias.copy_(second.bias - second_copy.weight @ shift)
    transformed = nn.Sequential(first_copy, nn.Tanh(), FixedAffine(scale, shift), second_copy)
    return plain, transformed


def one_step(model: nn.Module, use_kfac: bool, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pre = KFACPreconditioner(model, damping=1e-12, kl_clip=None, inv_dtype=torch.float64) if use_kfac else None
    nn.functional.cross_entropy(model(x), y).backward()
    if pre is not None:
        pre.step()
    optimizer.step()


def divergence_after_step(use_kfac: bool) -> tuple[float, float]:
    """(max |log p_plain - log p_transformed|, max |change of log p_plain|) on fresh inputs after one step."""
    torch.set_default_dtype(torch.float64)
    try:
        plain, transformed = make_pair()
        torch.manual_seed(1)
        x, y = torch.randn(256, 4), torch.randint(0, 5, (256,))
        fresh = torch.randn(64, 4)
        before = plain(fresh).log_softmax(-1).detach()
        assert torch.allclose(before, transformed(fresh).log_softmax(-1), atol=1e-12)
        one_step(plain, use_kfac, x, y)
        one_step(transformed, use_kfac, x, y)
        after_plain = plain(fresh).log_softmax(-1).detach()
        after_transformed = transformed(fresh).log_softmax(-1).detach()
        return (after_plain - after_transformed).abs().max().item(), (after_plain - before).abs().max().item()
    finally:
        torch.set_default_dtype(torch.float32)


def test_kfac_step_is_invariant_to_affine_reparameterisation() -> None:
    gap, change = divergence_after_step(use_kfac=True)
    assert change > 1e-2, "the K-FAC step must actually change the function"
    assert gap < 1e-6 * change, f"K-FAC updates diverged: gap {gap:.3e} vs change {change:.3e}"


def test_sgd_step_is_not_invariant() -> None:
    gap, change = divergence_after_step(use_kfac=False)
    assert change > 1e-2
    assert gap > 1e-2 * change, f"SGD should not be invariant: gap {gap:.3e} vs change {change:.3e}"
