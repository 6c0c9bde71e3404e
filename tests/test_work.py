"""kfac_dist.work: the counted work agrees with what the library's own kernels do (FLOPs counted by torch, bytes of
the real decompositions), and with the load placement balances."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kfac_dist.methods import EIGH_FLOPS_PER_N3, METHODS
from kfac_dist.placement import LayerShape, compute_cost
from kfac_dist.registry import register_layers
from kfac_dist.work import LAYER_PHASES, Work, layer_work

LAYERS = {
    "conv": nn.Conv2d(4, 6, 3, padding=1, groups=2),  # two blocks, unfolded rows
    "linear": nn.Linear(5, 3),
    "pointwise": nn.Conv2d(3, 2, 1, bias=False),
    "embedding": nn.Embedding(7, 4),  # a diagonal A
}
INPUTS = {
    "conv": torch.randn(2, 4, 5, 5),
    "linear": torch.randn(6, 5),
    "pointwise": torch.randn(3, 3, 4, 4),
    "embedding": torch.randint(0, 7, (3, 5)),
}


def _flops(fn: object, *args: object) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)  # type: ignore[operator]
    return int(counter.get_total_flops())


@pytest.mark.parametrize("name", list(LAYERS))
def test_factor_and_precondition_flops_are_the_librarys_kernels(name: str) -> None:
    torch.manual_seed(0)
    module = LAYERS[name]
    states, _ = register_layers(nn.ModuleDict({name: module}), ())
    layer, shape = states[name].layer, states[name].shape()
    output = module(INPUTS[name])
    rows = int(layer.output_rows(output).shape[1])
    gram = _flops(layer.a_contribution, INPUTS[name], torch.float32)
    gram += _flops(layer.g_contribution, torch.randn_like(output), torch.float32, 1.0)
    assert layer_work(shape, "factor_computation", method="eigen", rows=rows).gemm_flops == gram
    a = layer.a_contribution(INPUTS[name], torch.float32)[0]
    g = layer.g_contribution(torch.randn_like(output), torch.float32, 1.0)
    grad = torch.randn(shape.grad_shape())
    for method_name, method in METHODS.items():
        decomposition = method.decompose(a, g, a_diagonal=shape.a_diagonal, damping=0.1, dtype=torch.float32)
        work = layer_work(shape, "preconditioning", method=method_name)
        if not shape.a_diagonal:  # a diagonal A is a scaling, not a product: the count is an upper bound there
            assert work.gemm_flops == _flops(method.precondition, decomposition, grad, 0.1), method_name
        decomposed = layer_work(shape, "decomposition", method=method_name)
        assert decomposed.finite_bytes == decomposition.nbytes(), method_name  # every stored field is checked
        assert decomposed.decompositions == shape.blocks * (1 if shape.a_diagonal else 2)


@pytest.mark.parametrize(("method", "per_n3"), [("eigen", EIGH_FLOPS_PER_N3), ("inverse", 1.0)])
def test_decomposition_flops_are_the_load_placement_balances(method: str, per_n3: float) -> None:
    for a, g, blocks in ((3, 2, 1), (10, 7, 3), (257, 64, 2)):
        shape = LayerShape("x", a, g, grad_numel=a * g * blocks, blocks=blocks)
        assert layer_work(shape, "decomposition", method=method).decomposition_flops == per_n3 * compute_cost(shape)


def test_every_layer_phase_has_work_and_others_none() -> None:
    shape = LayerShape("x", 5, 4, grad_numel=20)
    for phase in LAYER_PHASES:
        assert layer_work(shape, phase, method="eigen", rows=8, unfold=True) != Work(), phase
    assert layer_work(shape, "factor_communication", method="eigen") == Work()
    unfolded = layer_work(shape, "factor_computation", method="eigen", rows=8, unfold=True)
    assert unfolded.im2col_calls == 1 and unfolded.im2col_bytes == 4 * 8 * 5
    assert layer_work(shape, "factor_computation", method="eigen", rows=8).im2col_calls == 0
    total = layer_work(shape, "kl_clip", method="eigen") + layer_work(shape, "preconditioning", method="eigen")
    assert total.copy_calls == 7 and total.gemm_calls == 4
