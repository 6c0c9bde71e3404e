"""Shape groups: batched decomposition and preconditioning equal the per-layer formulas, block by block, and a
group's work is a fixed number of operators however many layers it holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench.operators import OperatorCount
from kfac_dist.layers.batched import stack_grad_matrices, write_grad_matrices
from kfac_dist.methods import COMPUTE_METHODS, get_method
from kfac_dist.worklist import build_groups


class Mixed(nn.Module):
    """Layers that share shapes (two 3x3 convs, two linears with bias), a grouped conv and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(6, 6, 1, groups=2)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).permute(0, 3, 1, 2)  # (N, 6, H, W)
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        x = self.grouped(x).mean(dim=(2, 3))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def backward(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (4, 5, 5), generator=generator)
    target = torch.randint(0, 3, (4,), generator=generator)
    model.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(tokens), target).backward()


def trained(method: str, dtype: torch.dtype, steps: int = 3) -> tuple[nn.Module, KFACPreconditioner]:
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    pre = KFACPreconditioner(model, compute_method=method, damping=0.1)
    for step in range(steps):
        backward(model, step)
        pre.step()
    return model, pre


def test_layers_of_one_shape_and_type_share_a_group() -> None:
    model, pre = trained("eigen", torch.float64, steps=1)
    groups = [[s.name for s in group.states] for group in build_groups(pre._states.values())]
    assert groups == [["embed"], ["conv1", "conv2"], ["grouped"], ["fc1", "fc2"], ["head"]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", COMPUTE_METHODS)
def test_batched_preconditioning_equals_each_layer_alone(method: str, dtype: torch.dtype) -> None:
    model, pre = trained(method, dtype)
    backward(model, 7)
    raw = {name: s.layer.grad_matrix().clone() for name, s in pre._states.items()}
    inner = 0.0
    expected = {}
    for name, state in pre._states.items():  # the per-layer formula, on each layer's own decomposition
        assert state.decomposition is not None
        expected[name] = pre.method.precondition(state.decomposition, raw[name], 0.1).to(dtype)
        inner += float((expected[name] * raw[name]).sum())
    pre.options = pre.options.at_step(0)
    pre._precondition(0.1, pre.steps)
    scale = min(1.0, (pre.options.kl_clip / (0.1**2 * abs(inner))) ** 0.5)  # lr 0.1 (the default)
    for name, state in pre._states.items():
        torch.testing.assert_close(state.layer.grad_matrix(), expected[name] * scale, rtol=1e-5, atol=0.0)


def test_stacked_reading_and_writing_equal_the_layers_own() -> None:
    model, pre = trained("eigen", torch.float64, steps=1)
    backward(model, 3)
    for group in build_groups(pre._states.values()):
        layers = [s.layer for s in group.states]
        stacked = stack_grad_matrices(layers)
        assert torch.equal(stacked, torch.cat([layer.grad_matrix() for layer in layers]))
        new = torch.randn_like(stacked)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        write_grad_matrices(layers, new, copies)
        for grad, value in copies:
            grad.copy_(value)
        assert torch.equal(torch.cat([layer.grad_matrix() for layer in layers]), new)


def test_each_layers_decomposition_is_a_view_of_its_groups_stack() -> None:
    model, pre = trained("eigen", torch.float64, steps=1)
    conv1, conv2 = pre._states["conv1"].decomposition, pre._states["conv2"].decomposition
    assert conv1 is not None and conv2 is not None
    for field in ("q_a", "l_a", "q_g", "l_g"):
        first, second = conv1.tensors[field], conv2.tensors[field]
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # one stack
        assert second.data_ptr() - first.data_ptr() == first.nbytes  # consecutive blocks
    # ... and the same numbers as decomposing the layer alone
    alone = get_method("eigen").decompose(
        pre._states["conv2"].a, pre._states["conv2"].g, a_diagonal=False, damping=0.1, dtype=pre.inv_dtype
    )
    for field, tensor in alone.tensors.items():
        assert torch.equal(conv2.tensors[field], tensor), field
    per_layer = sum(t.nbytes for s in pre._states.values() if s.decomposition for t in s.decomposition.tensors.values())
    assert pre.memory_usage()["decompositions"] == per_layer


def test_a_groups_work_is_a_fixed_number_of_operators() -> None:
    """pre.step() on a plain step dispatches as many operators for 2 same-shaped layers as for 12."""

    def plain_step_operators(depth: int) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh()) for _ in range(depth)])
        pre = KFACPreconditioner(model, inv_update_steps=2, factor_update_steps=2)
        for _ in range(2):  # the second step is a plain one: no factors, no decomposition
            model.zero_grad()
            model(torch.randn(4, 8)).square().sum().backward()
            with OperatorCount() as count:
                pre.step()
        return count.total

    assert plain_step_operators(2) == plain_step_operators(12)


def test_a_factor_that_fails_as_a_group_is_retried_in_float64_for_every_member() -> None:
    model, pre = trained("eigen", torch.float32, steps=1)
    conv1 = pre._states["conv1"]
    assert conv1.a is not None
    conv1.a[0, 0, 0] = float("nan")  # the group's float32 and float64 attempts fail: each layer on its own
    pre._update_decompositions(0.1, pre._schedule.names)
    health = pre.health()
    assert health["decomposition_retried_float64"] == 1  # conv1 alone retried: its own ladder
    assert health["decomposition_kept_previous"] == 1
    assert pre._states["conv2"].decomposition is not None
