"""kfac-dist's factors and preconditioned gradients against dense float64 references (tests/reference.py).

For every supported layer kind the reference builds A and G by hand (loops over conv output locations and
kernel offsets; g from each example's own loss), averages them with ``F_k = decay F_{k-1} + (1 - decay) F_b``,
and preconditions the raw gradient with ``(A (x) G + damping I)^-1 vec(M)`` (eigen) or the factored-damping
formula with the pi correction (inverse), built with ``torch.kron`` and ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from reference import (
    RefLayer,
    assert_rel_close,
    ce_per_example,
    conv_by_patches,
    grad_output_G,
    kl_clip_scale,
    precondition_dense,
    reference_layers,
    run_steps,
    running_average,
    split_gradient_matrix,
)
from torch import Tensor, nn

from kfac_dist import KFACPreconditioner

DTYPE = torch.float64
CLASSES = 3
DAMPING = 1e-3
RTOL = 1e-6

Batch = tuple[Tensor, Tensor]


class Mean(nn.Module):
    """Mean over the given dims (global average pooling)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=self.dims)


@dataclass(frozen=True)
class Case:
    """A tiny float64 model and a batch generator."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], Batch]

    def batches(self, sizes: tuple[int, ...], seed: int = 0) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        return [self.make_batch(n, gen) for n in sizes]


def _dense_batch(shape: tuple[int, ...], label_shape: tuple[int, ...] = ()) -> Callable[[int, torch.Generator], Batch]:
    def make(n: int, gen: torch.Generator) -> Batch:
        x = torch.randn(n, *shape, generator=gen, dtype=DTYPE)
        y = torch.randint(0, CLASSES, (n, *label_shape), generator=gen)
        return x, y

    return make


def _conv2d_case(name: str, cin: int, cout: int, k: int | tuple[int, int], hw: tuple[int, int], **kw: Any) -> Case:
    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, **kw),
            nn.Tanh(),
            Mean((2, 3)),
            nn.Linear(cout, CLASSES),
        )

    return Case(name, model, _dense_batch((cin, *hw)))


def _conv1d_case(name: str, cin: int, cout: int, k: int, length: int, **kw: Any) -> Case:
    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(cin, cout, k, **kw),
            nn.Tanh(),
            Mean((2,)),
            nn.Linear(cout, CLASSES),
        )

    return Case(name, model, _dense_batch((cin, length)))


def _embedding_case(name: str, padding_idx: int | None) -> Case:
    def model() -> nn.Module:
        return nn.Sequential(nn.Embedding(7, 4, padding_idx=padding_idx), nn.Tanh(), nn.Linear(4, CLASSES))

    def make(n: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, 7, (n, 5), generator=gen)
        idx[:, -1] = 0  # every example looks up index 0 (the padding index where there is one)
        idx[0, 0] = 3  # and index 3 twice in the first example
        idx[0, 1] = 3
        return idx, torch.randint(0, CLASSES, (n, 5), generator=gen)

    return Case(name, model, make)


CASES = [
    Case(
        "linear_2d",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, CLASSES)),
        _dense_batch((5,)),
    ),
    Case(
        "linear_3d_nobias",
        lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, CLASSES)),
        _dense_batch((3, 5), (3,)),
    ),
    Case(
        "linear_4d",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, CLASSES, bias=False)),
        _dense_batch((2, 3, 5), (2, 3)),
    ),
    _conv2d_case("conv2d_stride2_pad1", 3, 4, 3, (6, 6), stride=2, padding=1),
    _conv2d_case("conv2d_same_dil2", 3, 4, 3, (5, 5), padding="same", dilation=2),
    _conv2d_case("conv2d_same_even_kernel", 2, 3, (2, 4), (4, 5), padding="same"),
    _conv2d_case("conv2d_valid_rect", 3, 4, (2, 3), (5, 6), padding="valid", bias=False),
    _conv2d_case("conv2d_dil_stride_pad_tuple", 3, 4, 3, (7, 8), dilation=(2, 1), stride=(1, 2), padding=(1, 2)),
    _conv2d_case("conv2d_groups2", 4, 6, 3, (5, 5), groups=2, padding=1),
    _conv2d_case("conv2d_depthwise", 3, 6, 3, (5, 5), groups=3, padding=1, stride=2),
    _conv2d_case("conv2d_reflect", 3, 4, 3, (5, 5), padding=1, padding_mode="reflect"),
    _conv2d_case("conv2d_circular", 3, 4, 3, (5, 5), padding=2, stride=2, padding_mode="circular"),
    _conv2d_case("conv2d_replicate_same", 2, 3, 4, (5, 5), padding="same", padding_mode="replicate"),
    _conv1d_case("conv1d_stride_dil", 3, 4, 3, 9, stride=2, padding=1, dilation=2),
    _conv1d_case("conv1d_groups_reflect", 4, 4, 3, 7, groups=2, padding=1, padding_mode="reflect"),
    _conv2d_case("conv2d_pointwise_stride2", 3, 4, 1, (5, 6), stride=2),  # ResNet's downsample shortcut
    _conv2d_case("conv2d_pointwise_pad_groups", 4, 6, 1, (3, 4), padding=1, groups=2, stride=(1, 3)),
    _conv1d_case("conv1d_pointwise_stride3", 3, 4, 1, 8, stride=3, bias=False),
    _embedding_case("embedding", None),
    _embedding_case("embedding_padding_idx", 0),
]
CASE_IDS = [c.name for c in CASES]
CONV_CASES = [c for c in CASES if c.name.startswith("conv")]


def _make(case: Case, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(model for kfac_dist, untouched deep copy for the reference)."""
    torch.manual_seed(seed)
    model = case.make_model().to(DTYPE)
    return model, copy.deepcopy(model)


def _pre(model: nn.Module, **kw: Any) -> KFACPreconditioner:
    opts: dict[str, Any] = {
        "damping": DAMPING,
        "factor_decay": 0.75,
        "kl_clip": None,
        "inv_dtype": DTYPE,
        "factor_update_steps": 1,
        "inv_update_steps": 1,
    }
    opts.update(kw)
    return KFACPreconditioner(model, **opts)


def _expected_grads(
    ref: dict[str, RefLayer], a: dict[str, Tensor], g: dict[str, Tensor], method: str
) -> dict[str, tuple[Tensor, Tensor | None]]:
    out = {}
    for name, layer in ref.items():
        v = precondition_dense(a[name], g[name], layer.M, DAMPING, method)
        out[name] = split_gradient_matrix(layer.module, v)
    return out


def _check_grads(got: dict[str, tuple[Tensor, Tensor | None]], exp: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    assert got.keys() == exp.keys()
    for name, (w, b) in exp.items():
        assert_rel_close(got[name][0], w, RTOL, f"{name}.weight.grad")
        if b is None:
            assert got[name][1] is None, name
        else:
            gb = got[name][1]
            assert gb is not None, name
            assert_rel_close(gb, b, RTOL, f"{name}.bias.grad")


def _check_factors(got: dict[str, tuple[Tensor, Tensor]], ref: dict[str, RefLayer], rtol: float = 1e-10) -> None:
    assert got.keys() == ref.keys()
    for name, layer in ref.items():
        a, g = got[name]
        assert_rel_close(a, layer.library_layout_A(), rtol, f"{name}: A")
        assert_rel_close(g, layer.library_layout_G(), rtol, f"{name}: G")


# ------------------------------------------------------------------------------------------------------------
# the reference checks itself (no kfac_dist involved)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=[c.name for c in CONV_CASES])
def test_reference_patches_reproduce_the_convolution(case: Case) -> None:
    model, _ = _make(case)
    ((x, _),) = case.batches((2,))
    conv = model.get_submodule("0")
    assert isinstance(conv, nn.Conv1d | nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(conv_by_patches(x, conv), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[-1]], ids=lambda c: c.name)
def test_reference_G_per_example_equals_scaled_grad_output(case: Case, reduction: str) -> None:
    model, _ = _make(case)
    ((x, y),) = case.batches((4,))
    ref = reference_layers(model, x, y, ce_per_example, reduction)
    for name in ("0", "2"):
        hooked = grad_output_G(model, name, x, y, ce_per_example, reduction)
        torch.testing.assert_close(hooked, ref[name].G[0], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# kfac_dist against the reference
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_first_step_factors_are_the_batch_factors(case: Case) -> None:
    model, ref_model = _make(case)
    batches = case.batches((4,))
    (rec,) = run_steps(model, _pre(model), batches, ce_per_example)
    x, y = batches[0]
    _check_factors(rec.factors, reference_layers(ref_model, x, y, ce_per_example))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_running_average_and_preconditioned_grad(case: Case, method: str) -> None:
    decay = 0.75
    model, ref_model = _make(case, seed=1)
    batches = case.batches((4, 3, 5), seed=1)
    records = run_steps(model, _pre(model, compute_method=method, factor_decay=decay), batches, ce_per_example)
    refs = [reference_layers(ref_model, x, y, ce_per_example) for x, y in batches]
    for k, rec in enumerate(records):
        a = {n: running_average([r[n].A for r in refs[: k + 1]], decay) for n in refs[k]}
        g = {n: running_average([r[n].G for r in refs[: k + 1]], decay) for n in refs[k]}
        for name, layer in refs[k].items():
            ga, gg = rec.factors[name]
            want = RefLayer(layer.module, a[name], g[name], layer.M, layer.rows, layer.examples)
            assert_rel_close(ga, want.library_layout_A(), 1e-10, f"step {k}: {name}: A")
            assert_rel_close(gg, want.library_layout_G(), 1e-10, f"step {k}: {name}: G")
        _check_grads(rec.grads, _expected_grads(refs[k], a, g, method))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize(
    "case", [CASES[0], CASES[8], CASES[-1]], ids=lambda c: c.name
)  # linear, groups=2 conv, embedding
def test_kl_clip_scales_every_layer(case: Case, method: str) -> None:
    lr = 0.1
    model, ref_model = _make(case, seed=2)
    batches = case.batches((4,), seed=2)
    x, y = batches[0]
    ref = reference_layers(ref_model, x, y, ce_per_example)
    vs = {n: precondition_dense(r.A, r.G, r.M, DAMPING, method) for n, r in ref.items()}
    vg = sum(float((vs[n] * r.M).sum()) for n, r in ref.items())
    kl_clip = 0.09 * lr**2 * abs(vg)  # nu = 0.3
    nu = kl_clip_scale(list(vs.values()), [r.M for r in ref.values()], kl_clip, lr)
    assert abs(nu - 0.3) < 1e-12
    (rec,) = run_steps(model, _pre(model, compute_method=method, kl_clip=kl_clip, lr=lr), batches, ce_per_example)
    exp = {n: split_gradient_matrix(r.module, nu * vs[n]) for n, r in ref.items()}
    _check_grads(rec.grads, exp)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[-1]], ids=lambda c: c.name)
def test_sum_and_mean_reduction(case: Case, method: str) -> None:
    """Same factors; the sum-loss gradient is N times the mean-loss one, so is its preconditioned value."""
    model_m, ref_model = _make(case, seed=3)
    model_s = copy.deepcopy(model_m)
    batches = case.batches((4, 6), seed=3)
    rec_m = run_steps(model_m, _pre(model_m, compute_method=method), batches, ce_per_example, "mean")
    pre_s = _pre(model_s, compute_method=method, loss_reduction="sum")
    rec_s = run_steps(model_s, pre_s, batches, ce_per_example, "sum")
    for (x, _), rm, rs in zip(batches, rec_m, rec_s, strict=True):
        n = x.shape[0]
        for name in rm.factors:
            for fm, fs in zip(rm.factors[name], rs.factors[name], strict=True):
                assert_rel_close(fs, fm, 1e-10, f"{name}: sum vs mean factor")
            assert_rel_close(rs.grads[name][0], n * rm.grads[name][0], RTOL, f"{name}: weight")
    # and the sum run against the reference directly
    x, y = batches[0]
    ref = reference_layers(ref_model, x, y, ce_per_example, "sum")
    a = {k: r.A for k, r in ref.items()}
    g = {k: r.G for k, r in ref.items()}
    _check_grads(rec_s[0].grads, _expected_grads(ref, a, g, method))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[9], CASES[-1]], ids=lambda c: c.name)
def test_duplicating_the_batch_leaves_the_factors_unchanged(case: Case) -> None:
    model_1, _ = _make(case, seed=4)
    model_2 = copy.deepcopy(model_1)
    ((x, y),) = case.batches((3,), seed=4)
    (r1,) = run_steps(model_1, _pre(model_1), [(x, y)], ce_per_example)
    (r2,) = run_steps(model_2, _pre(model_2), [(torch.cat([x, x]), torch.cat([y, y]))], ce_per_example)
    for name, (a1, g1) in r1.factors.items():
        a2, g2 = r2.factors[name]
        assert_rel_close(a2, a1, 1e-12, f"{name}: A")
        assert_rel_close(g2, g1, 1e-12, f"{name}: G")
    # the mean-loss gradient of the duplicated batch is the same, so is its preconditioned value
    for name, (w1, _) in r1.grads.items():
        assert_rel_close(r2.grads[name][0], w1, RTOL, f"{name}: grad")


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("case", [CASES[1], CASES[8], CASES[-1]], ids=lambda c: c.name)
def test_accumulation_equals_the_concatenated_batch(case: Case, method: str) -> None:
    """Two micro-batches (loss / 2 each, one pre.step()) == one step on their concatenation."""
    model, ref_model = _make(case, seed=5)
    micro = case.batches((3, 2), seed=5)
    pre = _pre(model, compute_method=method, accumulation_steps=2)
    model.zero_grad(set_to_none=True)
    for x, y in micro:
        (ce_per_example(model(x), y).mean() / 2).backward()
    pre.step()
    x = torch.cat([b[0] for b in micro])
    y = torch.cat([b[1] for b in micro])
    ref = reference_layers(ref_model, x, y, ce_per_example)
    _check_factors(pre.factors(), ref)
    # the accumulated gradient is the mean of the two micro-batch means, not the mean over all 5 examples
    ref_parts = [reference_layers(ref_model, xb, yb, ce_per_example) for xb, yb in micro]
    a = {k: r.A for k, r in ref.items()}
    g = {k: r.G for k, r in ref.items()}
    for k, r in ref.items():
        r.M = (ref_parts[0][k].M + ref_parts[1][k].M) / 2
    got: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name in ref:
        mod = model.get_submodule(name)
        w, b = mod.weight, getattr(mod, "bias", None)
        assert isinstance(w, Tensor) and w.grad is not None
        got[name] = (w.grad, None if b is None else b.grad)
    _check_grads(got, _expected_grads(ref, a, g, method))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_unbatched_linear_input_is_one_example(method: str) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, CLASSES)).to(DTYPE)
    ref_model = copy.deepcopy(model)
    x = torch.randn(5, dtype=DTYPE)
    y = torch.tensor(1)
    (rec,) = run_steps(model, _pre(model, compute_method=method), [(x, y)], ce_per_example)
    ref = reference_layers(ref_model, x, y, ce_per_example)
    assert all(r.examples == 1 and r.rows == 1 for r in ref.values())
    _check_factors(rec.factors, ref)
    a = {k: r.A for k, r in ref.items()}
    g = {k: r.G for k, r in ref.items()}
    _check_grads(rec.grads, _expected_grads(ref, a, g, method))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_embedding_padding_row_stays_zero(method: str) -> None:
    case = CASES[-1]
    assert case.name == "embedding_padding_idx"
    model, _ = _make(case, seed=7)
    (rec,) = run_steps(model, _pre(model, compute_method=method), case.batches((4,), seed=7), ce_per_example)
    w = rec.grads["0"][0]
    assert torch.count_nonzero(w[0]) == 0
    assert torch.count_nonzero(w[1:]) > 0
