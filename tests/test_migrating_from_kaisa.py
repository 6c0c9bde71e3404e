"""docs/migrating-from-kaisa.md: its kfac-dist code runs, its option table names our real arguments, and its damping
conversion holds on our real factors and preconditioned gradients.

KAISA (kfac-pytorch 0.4.2) is not installed and not imported: its factors are built here from the definitions the
document states (rows averaged over the N T rows of a batch; G rows are autograd's output gradients of the mean loss;
Conv2d rows divided by T), and its preconditioning from the formulas it states.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference import conv_patches
from torch import Tensor, nn

from kfac_dist import KFACPreconditioner
from kfac_dist.options import OPTION_FIELDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-kaisa.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def kfac_dist_blocks() -> list[str]:
    """The document's Python blocks that start with ``# kfac-dist``, in order."""
    return [code for code in BLOCK.findall(DOC.read_text()) if code.startswith("# kfac-dist\n")]


class SmallCNN(nn.Module):
    """Two convolutions and a classifier named ``fc`` (the document's loop skips ``*fc*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def test_the_documents_kfac_dist_code_runs(tmp_path: Path) -> None:
    loop, checkpoint = kfac_dist_blocks()  # the training loop, then the checkpoint
    torch.manual_seed(0)
    model = SmallCNN()
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    namespace: dict[str, Any] = {"model": model, "loader": loader, "epochs": 1}
    exec(compile(loop, f"{DOC.name}: training loop", "exec"), namespace)

    pre: KFACPreconditioner = namespace["pre"]
    optimizer: torch.optim.Optimizer = namespace["optimizer"]
    assert math.isfinite(namespace["loss"].item())
    assert pre.steps == 3
    assert pre.report().preconditioned == ["conv1", "conv2"] and "fc" in pre.report().skipped

    x, y = loader[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    pre.step()
    for name, p in model.named_parameters():
        assert p.grad is not None
        if name.startswith("fc."):
            assert torch.equal(p.grad, raw[name]), name  # skipped: the raw gradient
        else:
            assert torch.isfinite(p.grad).all() and not torch.allclose(p.grad, raw[name]), name

    saved = pre.state_dict()
    namespace["checkpoint_path"] = tmp_path / "checkpoint.pt"
    exec(compile(checkpoint, f"{DOC.name}: checkpoint", "exec"), namespace)
    assert namespace["checkpoint_path"].exists()
    assert pre.steps == saved["steps"] == 4
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, saved["factors"][name]["A"].squeeze(0)), name
        assert torch.equal(g, saved["factors"][name]["G"].squeeze(0)), name


def test_the_option_table_names_every_argument_of_ours_and_only_real_ones() -> None:
    rows = [line.split("|")[1:-1] for line in DOC.read_text().splitlines() if line.startswith("| ")]
    ours = [re.findall(r"`(\w+)`", row[1]) for row in rows if len(row) == 3 and row[1].strip() != "kfac-dist"]
    named = {names[0] for names in ours if names}
    parameters = set(inspect.signature(KFACPreconditioner).parameters) - {"model", "options", "overrides"}
    assert named == parameters | set(OPTION_FIELDS)  # KFACOptions' fields are keyword arguments too


# ------------------------------------------------------------------------------------- the damping conversion
def kaisa_factors(layer: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """KAISA's A and G from its definitions, with N (examples) and T (rows per example)."""
    n = x.shape[0]
    if isinstance(layer, nn.Conv2d):
        patches = conv_patches(x, layer)[:, :, 0]  # (N, T, k), one group
        t = patches.shape[1]
        a_rows = patches.reshape(n * t, -1)
        g_rows = grad_out.flatten(2).transpose(1, 2).reshape(n * t, -1)
        divide = float(t)  # KAISA divides Conv2d rows by T
    else:
        t = x[0].numel() // x.shape[-1]
        a_rows, g_rows, divide = x.reshape(n * t, -1), grad_out.reshape(n * t, -1), 1.0
    a_rows = torch.cat([a_rows, a_rows.new_ones(n * t, 1)], dim=1) / divide
    g_rows = g_rows / divide
    return a_rows.T @ a_rows / (n * t), g_rows.T @ g_rows / (n * t), n, t


def kaisa_eigen(a: Tensor, g: Tensor, m: Tensor, damping: float) -> Tensor:
    """KAISA's eigen preconditioning: ``Q_G [(Q_G^T M Q_A) / (l_G l_A^T + d)] Q_A^T``, eigenvalues clamped at 0."""
    l_a, q_a = torch.linalg.eigh(a)
    l_g, q_g = torch.linalg.eigh(g)
    return q_g @ ((q_g.T @ m @ q_a) / (torch.outer(l_g.clamp(min=0), l_a.clamp(min=0)) + damping)) @ q_a.T


def grad_matrix(layer: nn.Module) -> Tensor:
    assert layer.weight.grad is not None and layer.bias.grad is not None
    return torch.cat([layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], dim=1)


def captured_step(
    model: nn.Module, layers: dict[str, nn.Module], x: Tensor, y: Tensor, make_pre: Callable[[], KFACPreconditioner]
) -> tuple[KFACPreconditioner, dict[str, tuple[Tensor, Tensor, Tensor]]]:
    """One step of our preconditioner; each layer's (input, output gradient of the mean loss, raw gradient matrix)."""
    pre = make_pre()
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}

    def capture(name: str, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        seen[name].append(args[0].detach())
        out.register_hook(lambda grad: seen[name].append(grad.detach()))

    handles = [layer.register_forward_hook(partial(capture, name)) for name, layer in layers.items()]
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    captured = {name: (seen[name][0], seen[name][1], grad_matrix(layer).clone()) for name, layer in layers.items()}
    pre.step()
    return pre, captured


class Probe(nn.Module):
    """One layer under test and a head that is not preconditioned."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


@pytest.mark.parametrize(
    ("layer", "shape", "features", "scale"),
    [
        (nn.Conv2d(2, 3, 3, padding=1), (4, 2, 5, 5), 3 * 25, lambda n, t: (t**2, n**2 * t**3)),
        (nn.Linear(4, 3), (3, 5, 4), 5 * 3, lambda n, t: (1, n**2 * t)),
    ],
    ids=["conv2d", "linear-on-sequences"],
)
def test_kaisa_damping_d_acts_like_ours_times_c(
    layer: nn.Module, shape: tuple[int, ...], features: int, scale: Callable[[int, int], tuple[int, int]]
) -> None:
    torch.manual_seed(1)
    model = Probe(layer, features).double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    n, t = shape[0], (shape[2] * shape[3] if isinstance(layer, nn.Conv2d) else shape[1])
    a_scale, g_scale = scale(n, t)
    c = a_scale * g_scale  # N^2 T^5 (Conv2d), N^2 T (Linear)
    assert c == (n**2 * t**5 if isinstance(layer, nn.Conv2d) else n**2 * t)
    d = 1e-3  # KAISA's damping

    pre, captured = captured_step(
        model,
        {"layer": model.layer},
        x,
        y,
        lambda: KFACPreconditioner(model, damping=c * d, kl_clip=None, skip_layers=["head"], inv_dtype=torch.float64),
    )
    inputs, grad_out, m = captured["layer"]
    a_k, g_k, n_seen, t_seen = kaisa_factors(model.layer, inputs, grad_out)
    assert (n_seen, t_seen) == (n, t)
    a, g = pre.factors()["layer"]
    torch.testing.assert_close(a_k * a_scale, a, rtol=1e-10, atol=0)  # KAISA's A = A / T^2 (Conv2d)
    torch.testing.assert_close(g_k * g_scale, g, rtol=1e-10, atol=0)  # KAISA's G = G / (N^2 T^3), G / (N^2 T)

    ours = grad_matrix(model.layer)
    assert not torch.allclose(ours, m)
    torch.testing.assert_close(kaisa_eigen(a_k, g_k, m, d), c * ours, rtol=1e-8, atol=0)  # V_KAISA(d) = c V(c d)

    # inverse method: KAISA's (G_K + d)^-1 M (A_K + d)^-1 = c (G + d g_scale)^-1 M (A + d a_scale)^-1 in our scale
    eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
    kaisa_inverse = torch.linalg.solve(g_k + d * eye_g, m) @ torch.linalg.inv(a_k + d * eye_a)
    ours_scale = torch.linalg.solve(g + d * g_scale * eye_g, m) @ torch.linalg.inv(a + d * a_scale * eye_a)
    torch.testing.assert_close(kaisa_inverse, c * ours_scale, rtol=1e-8, atol=0)


def test_linear_network_kaisa_run_is_ours_with_c_scaled_damping_lr_and_kl_clip() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    n = 8
    x, y = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 4, (n,))
    c, d, lr, kl_clip = n**2, 1e-3, 0.1, 1e-4  # KAISA's values; every layer has c = N^2
    layers = {"0": model[0], "2": model[2]}

    def ours() -> KFACPreconditioner:
        return KFACPreconditioner(model, damping=c * d, lr=c * lr, kl_clip=c * kl_clip, inv_dtype=torch.float64)

    _, captured = captured_step(model, layers, x, y, ours)
    kaisa = {}
    for name, (inputs, grad_out, m) in captured.items():
        a_k, g_k, _, _ = kaisa_factors(layers[name], inputs, grad_out)
        kaisa[name] = kaisa_eigen(a_k, g_k, m, d)
    vg = sum(float((kaisa[name] * captured[name][2]).sum()) * lr**2 for name in layers)
    nu = min(1.0, math.sqrt(kl_clip / abs(vg)))
    assert nu < 0.5  # the KL-clip binds, so its scale is part of what is compared
    for name, layer in layers.items():
        torch.testing.assert_close(c * grad_matrix(layer), nu * kaisa[name], rtol=1e-8, atol=0)
