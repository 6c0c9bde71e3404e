"""Public behaviour of KFACPreconditioner: options, report, health, schedule, accumulation, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))


def backward(model: nn.Module, x: torch.Tensor | None = None, seed: int = 1) -> None:
    torch.manual_seed(seed)
    x = torch.randn(8, 6) if x is None else x
    y = torch.randint(0, 3, (x.shape[0],))
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("factor_update_steps", 0),
        ("factor_update_steps", 1.5),
        ("inv_update_steps", -1),
        ("damping", 0.0),
        ("damping", -1.0),
        ("damping", "big"),
        ("factor_decay", 1.0),
        ("factor_decay", -0.1),
        ("kl_clip", 0.0),
        ("lr", -0.1),
        ("compute_method", "cholesky"),
        ("loss_reduction", "none"),
        ("accumulation_steps", 0),
        ("grad_scaler", 3),
        ("factor_dtype", torch.int64),
        ("inv_dtype", torch.float16),
        ("skip_layers", 5),
    ],
)
def test_invalid_option_raises_value_error_naming_it(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        KFACPreconditioner(mlp(), **{option: value})


def test_callable_hyperparameter_with_bad_value_names_option_and_step() -> None:
    model = mlp()
    pre = KFACPreconditioner(model, damping=lambda step: -1.0)
    backward(model)
    with pytest.raises(ValueError, match=r"damping .* at step 0"):
        pre.step()


def test_callable_hyperparameters_are_called_with_the_step() -> None:
    model = mlp()
    seen: list[int] = []

    def damping(step: int) -> float:
        seen.append(step)
        return 0.1

    pre = KFACPreconditioner(model, damping=damping)
    for _ in range(3):
        model.zero_grad()
        backward(model)
        pre.step()
    assert sorted(set(seen)) == [0, 1, 2]


def test_step_before_backward_is_a_clear_error() -> None:
    pre = KFACPreconditioner(mlp())
    with pytest.raises(RuntimeError, match="loss.backward"):
        pre.step()


def test_model_with_nothing_to_precondition_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no module K-FAC can precondition"):
        KFACPreconditioner(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    with pytest.raises(ValueError, match="skipped"):
        KFACPreconditioner(mlp(), skip_layers=["Linear"])


def test_kl_clip_none_disables_clipping_and_kl_clip_scales_by_formula() -> None:
    results = {}
    for kl_clip in (None, 1e-6):
        model = mlp()
        pre = KFACPreconditioner(model, kl_clip=kl_clip, lr=0.1, damping=0.1)
        backward(model)
        raw = [p.grad.clone() for p in model.parameters()]
        pre.step()
        results[kl_clip] = ([p.grad.clone() for p in model.parameters()], raw)
    unclipped, raw = results[None]
    clipped, _ = results[1e-6]
    inner = sum((v * g).sum() for v, g in zip(unclipped, raw, strict=True)).item()
    expected = min(1.0, math.sqrt(1e-6 / (0.1**2 * abs(inner))))
    assert expected < 1.0
    for v, c in zip(unclipped, clipped, strict=True):
        torch.testing.assert_close(c, v * expected, rtol=1e-5, atol=1e-8)


def test_report_lists_what_happened_to_every_module() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.embed(tokens)
            h, _ = self.attn(h, h, h)
            h = self.norm(h)
            h = torch.relu_(self.conv(h.transpose(1, 2))).transpose(1, 2)
            return self.head(self.frozen(h)).mean(1)

    torch.manual_seed(0)
    net = Net()
    pre = KFACPreconditioner(net, skip_layers=["head"])
    tokens = torch.randint(0, 10, (4, 7))
    nn.functional.cross_entropy(net(tokens), torch.randint(0, 4, (4,))).backward()
    pre.step()
    report = pre.report()
    assert report.preconditioned == ["embed", "conv"]
    assert report.skipped == {"head": "head"}
    assert set(report.unsupported) == {"attn", "norm"}
    assert report.inactive == ["attn.out_proj"]
    assert "attn.out_proj" in str(report)
    assert set(pre.factors()) == {"embed", "conv"}
    assert net.attn.out_proj.weight.grad is not None  # left to the optimizer, untouched


def test_in_place_relu_after_layer_gives_same_factors_as_out_of_place() -> None:
    factors = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(12, 2))
        pre = KFACPreconditioner(model)
        x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 2, (5,))
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        factors.append(pre.factors())
    for name in factors[0]:
        for first, second in zip(factors[0][name], factors[1][name], strict=True):
            assert torch.equal(first, second)


def test_nothing_is_captured_on_steps_that_do_not_update_factors() -> None:
    model = mlp()
    pre = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=4)
    hooked: list[bool] = []
    model[0].register_forward_hook(lambda m, a, out: hooked.append(bool(out._backward_hooks)))
    backward(model)
    pre.step()
    first = {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}
    model.zero_grad()
    backward(model, x=1e3 * torch.randn(8, 6))  # would change the factors if captured
    pre.step()
    assert hooked == [True, False]
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, first[name][0]) and torch.equal(g, first[name][1])


def test_nonfinite_batch_factor_is_skipped_and_counted() -> None:
    model = mlp()
    pre = KFACPreconditioner(model, factor_decay=0.5)
    backward(model)
    pre.step()
    good = {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}
    model.zero_grad()
    x = torch.randn(8, 6)
    x[0, 0] = float("nan")
    backward(model, x=x)
    pre.step()
    assert pre.health()["nonfinite_factor_skipped"] == 2
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, good[name][0]) and torch.equal(g, good[name][1])


def test_decomposition_failure_retries_in_float64_then_keeps_previous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = mlp()
    pre = KFACPreconditioner(model, inv_dtype=torch.float32)
    backward(model)
    pre.step()
    real_eigh = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def failing_in_float32(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    model.zero_grad()
    backward(model)
    pre.step()
    assert pre.health()["decomposition_retried_float64"] == 2
    assert torch.float64 in calls
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(torch.linalg.LinAlgError("x")))
    model.zero_grad()
    backward(model)
    pre.step()
    assert pre.health()["decomposition_kept_previous"] == 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_accumulation_averages_factors_over_micro_batches() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    whole, micro = mlp(), mlp()
    pre_whole = KFACPreconditioner(whole, kl_clip=None)
    pre_micro = KFACPreconditioner(micro, kl_clip=None, accumulation_steps=2)
    nn.functional.cross_entropy(whole(x), y).backward()
    for half in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(micro(x[half]), y[half]) / 2).backward()
    pre_whole.step()
    pre_micro.step()
    for name, (a, g) in pre_whole.factors().items():
        torch.testing.assert_close(pre_micro.factors()[name][0], a)
        torch.testing.assert_close(pre_micro.factors()[name][1], g)
    for p, q in zip(whole.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_grad_scaler_is_divided_out_of_g() -> None:
    plain, scaled = mlp(), mlp()
    pre_plain = KFACPreconditioner(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pre_scaled = KFACPreconditioner(scaled, grad_scaler=scaler)
    pre_callable = KFACPreconditioner(mlp(), grad_scaler=lambda: 1024.0)
    assert pre_callable.grad_scaler is not None
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(plain(x), y).backward()
    scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
    for p in scaled.parameters():
        p.grad /= 1024.0  # what scaler.unscale_(optimizer) does
    pre_plain.step()
    pre_scaled.step()
    for name, (_a, g) in pre_plain.factors().items():
        torch.testing.assert_close(pre_scaled.factors()[name][1], g, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_restores_factors_and_steps() -> None:
    model = mlp()
    pre = KFACPreconditioner(model, inv_update_steps=10)
    for _ in range(3):
        model.zero_grad()
        backward(model)
        pre.step()
    state = pre.state_dict()
    other_model = mlp()
    other = KFACPreconditioner(other_model, inv_update_steps=10)
    other.load_state_dict(state)
    assert other.steps == 3
    for name, (a, g) in pre.factors().items():
        assert torch.equal(other.factors()[name][0], a) and torch.equal(other.factors()[name][1], g)
    # the restored preconditioner decomposes on its next step, even off the inverse schedule
    other_model.load_state_dict(model.state_dict())
    model.zero_grad()
    backward(model, seed=9)
    backward(other_model, seed=9)
    pre.step()
    other.step()
    for _p, q in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="shape"):
        KFACPreconditioner(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))).load_state_dict(state)
    with pytest.raises(ValueError, match="does not have"):
        KFACPreconditioner(nn.Sequential(nn.Linear(6, 5))).load_state_dict(state)


def test_factor_scale_does_not_depend_on_batch_size() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    factors = []
    for repeat in (1, 3):
        model = mlp()
        pre = KFACPreconditioner(model)
        nn.functional.cross_entropy(model(x.repeat(repeat, 1)), y.repeat(repeat)).backward()
        pre.step()
        factors.append(pre.factors())
    for name, (a, g) in factors[0].items():
        torch.testing.assert_close(factors[1][name][0], a)
        torch.testing.assert_close(factors[1][name][1], g)


def test_works_with_any_optimizer_and_decreases_loss() -> None:
    for make in (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.Adam(p, lr=1e-2)):
        model = mlp()
        optimizer = make(model.parameters())
        pre = KFACPreconditioner(model, damping=0.1)
        torch.manual_seed(4)
        x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            losses.append(loss.item())
            loss.backward()
            pre.step()
            optimizer.step()
        assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("symmetric_comm", [True, False])
def test_factor_sums_are_freed_once_handed_to_the_reduction(symmetric_comm: bool) -> None:
    model = mlp()
    pre = KFACPreconditioner(model, symmetric_comm=symmetric_comm)
    assert pre.memory_usage()["buffers"] == 0  # no factor step yet
    backward(model)
    states = pre._states.values()
    assert all(s.sent and s.accumulator.a_sum is None and s.accumulator.g_sum is None for s in states)
    pre.step()
    # One process sends nothing: the reduction keeps the batch factors A 7x7, G 5x5, A 6x6, G 3x3 (float32) as
    # they are, unpacked whatever symmetric_comm says (tests/test_distributed.py checks the packed buckets of W > 1).
    assert pre.memory_usage()["buffers"] == 4 * (49 + 25 + 36 + 9)


def test_profile_records_every_phase_of_factor_and_inverse_steps() -> None:
    model = mlp()
    pre = KFACPreconditioner(model, profile=True)
    assert all(seconds == 0.0 for seconds in pre.phase_times().values())
    backward(model)
    pre.step()
    times = pre.phase_times()
    for phase in ("factor_computation", "factor_communication", "factor_update", "decomposition", "preconditioning"):
        assert times[phase] > 0.0, phase
    pre.reset_phase_times()
    assert sum(pre.phase_times().values()) == 0.0
    unprofiled = KFACPreconditioner(mlp())
    backward(unprofiled.model)
    unprofiled.step()
    assert sum(unprofiled.phase_times().values()) == 0.0
