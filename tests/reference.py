"""Hand-written reference K-FAC constructions, independent of kfac_dist (which this module never imports).

Everything here follows docs/conventions.md literally and is written for clarity, not speed:

* convolution patches come from explicit Python loops over output locations and kernel offsets, with the
  padding (zeros / reflect / replicate / circular, ints / 'same' / 'valid') resolved by hand-written index
  arithmetic, not from ``F.unfold`` or ``F.pad``;
* ``g`` is the gradient of each example's *own* loss with respect to the layer output, obtained with one
  ``torch.autograd.grad`` call per example (so it does not rely on the "multiply grad_output by N" trick);
* preconditioning is done densely with ``torch.kron`` and ``torch.linalg.solve`` in float64, with column-major
  vec.

Shapes: a layer's gradient matrix ``M = [dL/dW | dL/db]`` has shape ``(d_out, d_in[+1])``; for a grouped
convolution every quantity carries a leading ``groups`` dimension: ``A (groups, n, n)``, ``G (groups, m, m)``,
``M (groups, m, n)``. ``nn.Embedding`` is treated as the linear layer ``s = W^T onehot(i)``, i.e. its ``M`` is
``weight.grad.T`` (``(embedding_dim, num_embeddings)``) and its ``A`` is a dense diagonal matrix here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PerExampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> (N,)`` tensor of per-example losses."""

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


# ----------------------------------------------------------------------------------------------------
# vec / Kronecker helpers
# ----------------------------------------------------------------------------------------------------
def vec(m: Tensor) -> Tensor:
    """Column-major vec of a matrix: stacks the columns of ``m``."""
    return m.T.reshape(-1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec`."""
    return v.reshape(cols, rows).T


def as_matrix(a: Tensor) -> Tensor:
    """A factor as a dense matrix (a 1-D tensor is a diagonal)."""
    return torch.diag(a) if a.dim() == 1 else a


# ----------------------------------------------------------------------------------------------------
# convolution patches by explicit loops
# ----------------------------------------------------------------------------------------------------
def _resolve_padding(conv: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as PyTorch applies it."""
    nd = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0)] * nd
        assert conv.padding == "same", conv.padding
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(int(p), int(p)) for p in conv.padding]


def _source_index(i: int, size: int, mode: str) -> int | None:
    """Index into the unpadded input that padded position ``i`` (unpadded coordinates) reads; None = zero."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":  # mirror without repeating the edge
        return -i if i < 0 else 2 * (size - 1) - i
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    if mode == "circular":
        return i % size
    raise ValueError(f"unknown padding_mode {mode!r}")


def conv_output_size(conv: nn.Conv1d | nn.Conv2d, in_size: Sequence[int]) -> list[int]:
    """Spatial output size of ``conv`` for spatial input size ``in_size``."""
    out = []
    for size, (pl, pr), k, s, d in zip(
        in_size, _resolve_padding(conv), conv.kernel_size, conv.stride, conv.dilation, strict=True
    ):
        out.append((size + pl + pr - d * (k - 1) - 1) // s + 1)
    return out


def conv_patches(x: Tensor, conv: nn.Conv1d | nn.Conv2d) -> Tensor:
    """im2col patches by explicit loops.

    Args:
        x: input of shape ``(N, C_in, *spatial)``.
        conv: the convolution.

    Returns:
        ``(N, L, groups, C_in/groups * prod(kernel))`` with ``L`` the number of output locations (row-major)
        and the patch ordered like ``conv.weight[o].reshape(-1)`` (channel, then kernel offsets row-major).
    """
    n, c_in = x.shape[:2]
    spatial = list(x.shape[2:])
    groups = conv.groups
    cin_g = c_in // groups
    pads = _resolve_padding(conv)
    out_size = conv_output_size(conv, spatial)
    kernel = list(conv.kernel_size)
    n_k = math.prod(kernel)
    locations = list(itertools.product(*[range(o) for o in out_size]))
    patches = x.new_zeros(n, len(locations), c_in, n_k)
    for li, loc in enumerate(locations):
        for ki, off in enumerate(itertools.product(*[range(k) for k in kernel])):
            src: list[int] = []
            for dim, (o, kk) in enumerate(zip(loc, off, strict=True)):
                pos = o * conv.stride[dim] + kk * conv.dilation[dim] - pads[dim][0]
                idx = _source_index(pos, spatial[dim], conv.padding_mode)
                if idx is None:
                    break
                src.append(idx)
            else:
                index: tuple[slice | int, ...] = (slice(None), slice(None), *src)
                patches[:, li, :, ki] = x[index]
    # (N, L, C_in, K) -> (N, L, groups, cin_g * K) with channel-major patch ordering
    return patches.reshape(n, len(locations), groups, cin_g * n_k)


def conv_by_patches(x: Tensor, conv: nn.Conv1d | nn.Conv2d) -> Tensor:
    """The convolution's output recomputed from :func:`conv_patches` (a self-check of the patches)."""
    p = conv_patches(x, conv)  # (N, L, g, k)
    groups = conv.groups
    w = conv.weight.reshape(groups, conv.out_channels // groups, -1)  # (g, cout_g, k)
    out = torch.einsum("nlgk,gok->nlgo", p, w).reshape(x.shape[0], p.shape[1], conv.out_channels)
    if conv.bias is not None:
        out = out + conv.bias
    out_size = conv_output_size(conv, list(x.shape[2:]))
    return out.permute(0, 2, 1).reshape(x.shape[0], conv.out_channels, *out_size)


# ----------------------------------------------------------------------------------------------------
# per-layer rows a (per example) and g (per example)
# ----------------------------------------------------------------------------------------------------
def _append_one(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a


def input_rows(module: nn.Module, x: Tensor) -> list[Tensor]:
    """Rows ``a`` of every example: list over examples of ``(groups, rows, n)`` tensors."""
    if isinstance(module, nn.Linear):
        xs = [x] if x.dim() == 1 else list(x)
        return [_append_one(xi.reshape(1, -1, module.in_features), module.bias is not None) for xi in xs]
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        p = conv_patches(x, module).permute(0, 2, 1, 3)  # (N, g, L, k)
        return [_append_one(pi, module.bias is not None) for pi in p]
    if isinstance(module, nn.Embedding):
        xs = [x] if x.dim() == 0 else list(x)
        eye = torch.eye(module.num_embeddings, dtype=module.weight.dtype)
        return [eye[xi.reshape(-1)].unsqueeze(0) for xi in xs]
    raise TypeError(type(module))


def output_rows(module: nn.Module, grad_out: Tensor) -> Tensor:
    """Rows ``g`` of ONE example's output gradient (shape without the batch dim) as ``(groups, rows, m)``."""
    if isinstance(module, nn.Linear):
        return grad_out.reshape(1, -1, module.out_features)
    if isinstance(module, nn.Embedding):
        return grad_out.reshape(1, -1, module.embedding_dim)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        g = grad_out.reshape(module.out_channels, -1).T  # (L, C_out)
        return g.reshape(g.shape[0], module.groups, -1).permute(1, 0, 2)
    raise TypeError(type(module))


def batch_size_of(module: nn.Module, x: Tensor) -> int:
    """N as the conventions define it (dim 0; a 1-D Linear input / 0-D index is one example)."""
    return 1 if _unbatched(module, x) else x.shape[0]


def gradient_matrix(module: nn.Module, w_grad: Tensor, b_grad: Tensor | None) -> Tensor:
    """``M = [dL/dW | dL/db]`` as ``(groups, d_out, d_in[+1])``."""
    if isinstance(module, nn.Embedding):
        return w_grad.T.unsqueeze(0)
    groups = getattr(module, "groups", 1)
    m = w_grad.reshape(groups, w_grad.shape[0] // groups, -1)
    if b_grad is not None:
        m = torch.cat([m, b_grad.reshape(groups, -1, 1)], dim=-1)
    return m


def split_gradient_matrix(module: nn.Module, m: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`gradient_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    if isinstance(module, nn.Embedding):
        return m[0].T, None
    w = module.weight
    assert isinstance(w, Tensor)
    has_bias = getattr(module, "bias", None) is not None
    wm = m[..., :-1] if has_bias else m
    return wm.reshape(w.shape), (m[..., -1].reshape(-1) if has_bias else None)


# ----------------------------------------------------------------------------------------------------
# reference factors of a whole model
# ----------------------------------------------------------------------------------------------------
@dataclass
class RefLayer:
    """Reference quantities of one layer for one batch (all with a leading groups dim)."""

    module: nn.Module
    A: Tensor  # (groups, n, n), dense (also for Embedding)
    G: Tensor  # (groups, m, m)
    M: Tensor  # (groups, m, n): gradient of the batch loss
    rows: int  # R
    examples: int  # N

    def library_layout_A(self) -> Tensor:
        """A as kfac_dist's ``factors()`` stores it (1-D diagonal for Embedding, no groups dim if 1 group)."""
        if isinstance(self.module, nn.Embedding):
            return torch.diagonal(self.A[0])
        return self.A[0] if self.A.shape[0] == 1 else self.A

    def library_layout_G(self) -> Tensor:
        """G as kfac_dist's ``factors()`` stores it."""
        return self.G[0] if self.G.shape[0] == 1 else self.G


def reference_layers(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    per_example_loss: PerExampleLoss,
    reduction: str = "mean",
    skip: Sequence[str] = (),
) -> dict[str, RefLayer]:
    """Batch factors and raw gradients of every supported layer of ``model`` for the batch ``(x, y)``.

    ``A = (1/R) sum_rows a a^T``; ``G = (1/N) sum_n sum_{rows of n} g g^T`` with ``g = d l_n / d s`` computed
    from example ``n``'s own loss; ``M`` is the gradient of ``mean_n l_n`` (reduction "mean") or ``sum_n l_n``
    ("sum").
    The model must not carry hooks of another tool (use a deep copy made before wrapping it).
    """
    mods = {name: m for name, m in model.named_modules() if isinstance(m, SUPPORTED) and name not in skip}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, mod in mods.items():

        def hook(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            assert name not in inputs, f"{name} called twice: not supported by the reference"
            inputs[name] = inp[0].detach()
            outputs[name] = out

        handles.append(mod.register_forward_hook(hook))
    try:
        losses = per_example_loss(model(x), y)
    finally:
        for h in handles:
            h.remove()
    names = list(mods)
    n_examples = {name: batch_size_of(mods[name], inputs[name]) for name in names}
    unbatched = {name: _unbatched(mods[name], inputs[name]) for name in names}
    assert losses.shape == (next(iter(n_examples.values())),), losses.shape

    layers: dict[str, RefLayer] = {}
    g_rows: dict[str, list[Tensor]] = {name: [] for name in names}
    for n in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[n], [outputs[k] for k in names], retain_graph=True)
        for name, go in zip(names, grads, strict=True):
            own = go if unbatched[name] else go[n]
            g_rows[name].append(output_rows(mods[name], own))
    total = losses.mean() if reduction == "mean" else losses.sum()
    params = [p for name in names for p in _params(mods[name])]
    pgrads = iter(torch.autograd.grad(total, params))
    for name in names:
        mod = mods[name]
        w_grad = next(pgrads)
        b_grad = next(pgrads) if getattr(mod, "bias", None) is not None else None
        a = torch.cat(input_rows(mod, inputs[name]), dim=1)  # (groups, R, n)
        g = torch.cat(g_rows[name], dim=1)  # (groups, rows, m)
        rows = a.shape[1]
        layers[name] = RefLayer(
            module=mod,
            A=a.transpose(1, 2) @ a / rows,
            G=g.transpose(1, 2) @ g / n_examples[name],
            M=gradient_matrix(mod, w_grad, b_grad),
            rows=rows,
            examples=n_examples[name],
        )
    return layers


def _unbatched(module: nn.Module, x: Tensor) -> bool:
    """Whether the layer input holds a single example without a batch dim."""
    if isinstance(module, nn.Linear):
        return x.dim() == 1
    return isinstance(module, nn.Embedding) and x.dim() == 0


def _params(module: nn.Module) -> list[Tensor]:
    ps = [module.weight, getattr(module, "bias", None)]
    return [p for p in ps if isinstance(p, Tensor)]


def grad_output_G(
    model: nn.Module, module_name: str, x: Tensor, y: Tensor, per_example_loss: PerExampleLoss, reduction: str
) -> Tensor:
    """G from grad_output captured with a plain tensor hook (times N for "mean"), for Linear/Embedding.

    A second, differently built reference for G, used to cross-check :func:`reference_layers`.
    """
    mod = model.get_submodule(module_name)
    captured: list[Tensor] = []

    def fwd(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        out.register_hook(lambda g: captured.append(g.detach()))

    h = mod.register_forward_hook(fwd)
    try:
        losses = per_example_loss(model(x), y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    finally:
        h.remove()
    model.zero_grad(set_to_none=True)
    (go,) = captured
    n = losses.shape[0]
    g = go.reshape(-1, go.shape[-1]) * (n if reduction == "mean" else 1)
    return g.T @ g / n


# ----------------------------------------------------------------------------------------------------
# running averages, dense preconditioning, KL clip
# ----------------------------------------------------------------------------------------------------
def running_average(batch_factors: Sequence[Tensor], decay: float) -> Tensor:
    """``F_1 = F_batch_1``; ``F_k = decay F_{k-1} + (1 - decay) F_batch_k``."""
    f = batch_factors[0].clone()
    for fb in batch_factors[1:]:
        f = decay * f + (1.0 - decay) * fb
    return f


def precondition_eigen_dense(a: Tensor, g: Tensor, m: Tensor, damping: float) -> Tensor:
    """``unvec((A (x) G + damping I)^-1 vec(M))`` per group, built densely (float64)."""
    out = []
    for ai, gi, mi in zip(a, g, m, strict=True):
        k = torch.kron(ai.double(), gi.double())
        rhs = vec(mi.double())
        sol = torch.linalg.solve(k + damping * torch.eye(k.shape[0], dtype=torch.float64), rhs)
        out.append(unvec(sol, *mi.shape))
    return torch.stack(out)


def pi_correction(a: Tensor, g: Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015)."""
    return math.sqrt((torch.trace(a).item() / a.shape[0]) / (torch.trace(g).item() / g.shape[0]))


def precondition_inverse_dense(a: Tensor, g: Tensor, m: Tensor, damping: float) -> Tensor:
    """``(G + sqrt(d)/pi I)^-1 M (A + pi sqrt(d) I)^-1`` per group, as one dense Kronecker solve (float64)."""
    out = []
    for ai, gi, mi in zip(a, g, m, strict=True):
        ai, gi = ai.double(), gi.double()
        pi = pi_correction(ai, gi)
        sd = math.sqrt(damping)
        a_d = ai + pi * sd * torch.eye(ai.shape[0], dtype=torch.float64)
        g_d = gi + sd / pi * torch.eye(gi.shape[0], dtype=torch.float64)
        sol = torch.linalg.solve(torch.kron(a_d, g_d), vec(mi.double()))
        out.append(unvec(sol, *mi.shape))
    return torch.stack(out)


def precondition_dense(a: Tensor, g: Tensor, m: Tensor, damping: float, method: str) -> Tensor:
    """Dispatch to the eigen (exact damping) or inverse (factored damping) dense formula."""
    if method == "eigen":
        return precondition_eigen_dense(a, g, m, damping)
    if method == "inverse":
        return precondition_inverse_dense(a, g, m, damping)
    raise ValueError(method)


def kl_clip_scale(vs: Sequence[Tensor], ms: Sequence[Tensor], kl_clip: float, lr: float) -> float:
    """``nu = min(1, sqrt(kl_clip / (lr^2 |sum_l <V_l, M_l>|)))`` (Ba et al. 2017)."""
    vg = sum(float((v.double() * m.double()).sum()) for v, m in zip(vs, ms, strict=True))
    return min(1.0, math.sqrt(kl_clip / (lr**2 * abs(vg))))


def per_example_fisher(grads: Sequence[Tensor]) -> Tensor:
    """Average of ``vec(g) vec(g)^T`` over per-example gradient matrices ``g``."""
    vs = torch.stack([vec(g) for g in grads])
    return vs.T @ vs / len(grads)


# ----------------------------------------------------------------------------------------------------
# losses, comparisons and a driver for any preconditioner with step() / factors() (shared by the tests)
# ----------------------------------------------------------------------------------------------------
def ce_per_example(out: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy summed over positions: ``out (N, ..., C)``, ``y (N, ...)`` -> ``(N,)``.

    A 1-D ``out`` is one unbatched example (result of shape ``(1,)``).
    """
    if out.dim() == 1:
        return F.cross_entropy(out.unsqueeze(0), y.reshape(1), reduction="none")
    per_pos = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    return per_pos.reshape(out.shape[0], -1).sum(dim=1)


def assert_rel_close(got: Tensor, expected: Tensor, rtol: float = 1e-6, what: str = "") -> None:
    """Elementwise ``|got - expected| <= rtol |expected| + 1e-3 rtol max|expected|`` (compared in float64)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    atol = 1e-3 * rtol * float(expected.abs().max()) + 1e-300
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


class StepFactors(Protocol):
    """What the tests need from a preconditioner (kfac_dist's KFACPreconditioner satisfies it)."""

    def step(self) -> None:
        """Precondition the gradients in place."""

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Current running-average factors."""
        ...


@dataclass
class StepRecord:
    """Gradients (after ``step()``) and factors of one training step."""

    grads: dict[str, tuple[Tensor, Tensor | None]]
    factors: dict[str, tuple[Tensor, Tensor]]


def run_steps(
    model: nn.Module,
    pre: StepFactors,
    batches: Sequence[tuple[Tensor, Tensor]],
    per_example_loss: PerExampleLoss,
    reduction: str = "mean",
) -> list[StepRecord]:
    """One ``forward; backward; pre.step()`` per batch (no optimizer step, so the parameters stay fixed)."""
    records = []
    mods = {name: m for name, m in model.named_modules() if isinstance(m, SUPPORTED)}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        losses = per_example_loss(model(x), y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        pre.step()
        grads = {}
        for name, m in mods.items():
            assert m.weight.grad is not None, name
            b = getattr(m, "bias", None)
            grads[name] = (m.weight.grad.clone(), None if b is None else b.grad.clone())
        records.append(StepRecord(grads, {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}))
    return records
