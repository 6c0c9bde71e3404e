"""The layer-type table: a user's module type, registered with its own KFACLayer, is preconditioned like nn.Linear."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner, register_layer_type
from kfac_dist.layers import LAYER_TYPES, ConvLayer, EmbeddingLayer, KFACLayer, LinearLayer, make_layer


class MatmulLinear(nn.Module):
    """A linear map with its own parameters, computed as ``x @ W.T + b`` (not an nn.Linear)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class MatmulLayer(KFACLayer):
    """The curvature of `MatmulLinear`, written from the KFACLayer interface alone."""

    module: MatmulLinear

    @property
    def blocks(self) -> int:
        return 1

    @property
    def a_side(self) -> int:
        return self.module.weight.shape[1] + 1

    @property
    def g_side(self) -> int:
        return self.module.weight.shape[0]

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, self.a_side - 1)
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1).unsqueeze(0)

    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(1, -1, self.g_side)

    def grad_matrix(self) -> torch.Tensor:
        weight, bias = self.module.weight.grad, self.module.bias.grad
        assert weight is not None and bias is not None
        return torch.cat([weight, bias.unsqueeze(1)], dim=1).unsqueeze(0)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        weight, bias = self.module.weight.grad, self.module.bias.grad
        assert weight is not None and bias is not None
        weight.copy_(matrix[0, :, :-1])
        bias.copy_(matrix[0, :, -1])


@pytest.fixture(autouse=True)
def restore_layer_types() -> Iterator[None]:
    """Every test here leaves the process-wide table as it found it."""
    saved = dict(LAYER_TYPES)
    yield
    LAYER_TYPES.clear()
    LAYER_TYPES.update(saved)


def models() -> tuple[nn.Sequential, nn.Sequential]:
    """A network with a `MatmulLinear` first layer, and the same network with an nn.Linear there."""
    torch.manual_seed(0)
    custom = nn.Sequential(MatmulLinear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference.load_state_dict(custom.state_dict())
    return custom, reference


def train(model: nn.Module, steps: int = 3) -> tuple[KFACPreconditioner, list[torch.Tensor], list[torch.Tensor]]:
    """A few SGD steps with K-FAC; every step's gradients, plain and preconditioned, flattened."""
    pre = KFACPreconditioner(model, damping=0.1, factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain, preconditioned = [], []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        plain.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        pre.step()
        preconditioned.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        optimizer.step()
    return pre, plain, preconditioned


def test_registered_module_is_preconditioned_like_nn_linear() -> None:
    register_layer_type(MatmulLinear, MatmulLayer)
    custom, reference = models()
    pre_custom, plain, grads_custom = train(custom)
    pre_reference, _, grads_reference = train(reference)
    assert pre_custom.report().preconditioned == ["0", "2"]
    assert pre_custom.report().unsupported == {}
    factors_custom, factors_reference = pre_custom.factors(), pre_reference.factors()
    assert set(factors_custom) == set(factors_reference) == {"0", "2"}
    for name in factors_custom:
        for mine, theirs in zip(factors_custom[name], factors_reference[name], strict=True):
            torch.testing.assert_close(mine, theirs)
    first = custom[0].weight.numel() + custom[0].bias.numel()
    for step, (mine, theirs) in enumerate(zip(grads_custom, grads_reference, strict=True)):
        torch.testing.assert_close(mine, theirs)
        assert not torch.allclose(mine[:first], plain[step][:first])  # K-FAC changed the custom layer's gradient


def test_unregistered_module_is_reported_unsupported_with_the_reason() -> None:
    custom, _ = models()
    pre = KFACPreconditioner(custom)
    assert pre.report().preconditioned == ["2"]
    assert pre.report().unsupported == {"0": "MatmulLinear is not a supported layer type"}


def test_registering_a_registered_type_raises_unless_replace() -> None:
    register_layer_type(MatmulLinear, MatmulLayer)
    with pytest.raises(ValueError, match="MatmulLinear is registered already.*replace=True"):
        register_layer_type(MatmulLinear, MatmulLayer)
    with pytest.raises(ValueError, match="Linear is registered already"):
        register_layer_type(nn.Linear, MatmulLayer)
    register_layer_type(nn.Linear, MatmulLayer, replace=True)
    assert isinstance(make_layer("fc", nn.Linear(3, 2)), MatmulLayer)
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        register_layer_type(int, MatmulLayer)  # type: ignore[arg-type]


def test_most_specific_registered_type_wins() -> None:
    class SubLinear(nn.Linear):
        pass

    class SubMatmul(MatmulLinear):
        pass

    assert type(make_layer("a", SubLinear(3, 2))) is LinearLayer  # a subclass of a registered type
    register_layer_type(SubLinear, MatmulLayer)
    register_layer_type(MatmulLinear, MatmulLayer)
    assert type(make_layer("a", SubLinear(3, 2))) is MatmulLayer
    assert type(make_layer("b", nn.Linear(3, 2))) is LinearLayer
    assert type(make_layer("c", SubMatmul(3, 2))) is MatmulLayer


def test_built_in_types_and_refusals_are_unchanged() -> None:
    assert type(make_layer("a", nn.Linear(3, 2))) is LinearLayer
    assert type(make_layer("b", nn.Conv1d(3, 2, 3))) is ConvLayer
    assert type(make_layer("c", nn.Conv2d(3, 2, 3))) is ConvLayer
    assert type(make_layer("d", nn.Embedding(5, 2))) is EmbeddingLayer
    assert make_layer("e", nn.Embedding(5, 2, sparse=True)) == (
        "nn.Embedding(sparse=True): sparse gradients are not preconditioned"
    )
    assert make_layer("f", nn.Conv3d(3, 2, 3)) == "Conv3d is not a supported layer type"
    partly_frozen = nn.Linear(3, 2)
    partly_frozen.bias.requires_grad_(False)
    assert make_layer("g", partly_frozen) == "only some of its parameters require gradients"
