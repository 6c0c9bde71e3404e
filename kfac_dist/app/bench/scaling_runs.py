"""Measurements of the scaling benchmark: kernels, collectives, library overheads and the arms on gloo processes.

Kernel calibration (:func:`measure_kernels`, this process), collectives (:func:`collective_worker`), the library's
costs beyond its kernels (:func:`local_worker`, one gloo process) and the arms on W gloo processes
(:func:`scaling_worker`; every step averages gradients in one flat allreduce).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench.arms import Arm, Block
from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.bench.gloo_runs import average_gradients
from kfac_dist.app.bench.scaling_model import FLOAT_BYTES
from kfac_dist.options import KFACOptions

__all__ = ["TINY_LAYER", "ArmSpec", "collective_worker", "local_worker", "measure_kernels", "scaling_worker"]

#: The tiny layer of :func:`local_worker`: ``Conv2d(channels, channels, 3, padding=1, bias=False)`` (as ResNet's
#: 3x3 convolutions) on ``batch`` inputs of ``channels x side x side``.
TINY_LAYER = {"channels": 2, "side": 2, "batch": 2}


@dataclass(frozen=True)
class ArmSpec:
    """One arm of a gloo run: an optimizer at a per-rank batch, in a scaling mode."""

    mode: str  # "weak" or "strong"
    optimizer: str  # "sgd" or "kfac"
    batch: int

    @property
    def name(self) -> str:
        """``"<mode>/<optimizer>"``."""
        return f"{self.mode}/{self.optimizer}"


def _median_time(fn: Callable[..., object], reps: int, *args: Any) -> float:
    """Median seconds of ``fn(*args)`` over `reps` calls after one untimed call."""
    fn(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_kernels(
    proxy: ModelSpec,
    batches: list[int],
    gemm_sizes: list[tuple[int, int, int]],
    copy_bytes: list[int],
    im2col_shapes: list[tuple[int, int, int, int]],
    eigh_sides: list[int],
    compute_steps: int = 10,
    compute_blocks: int = 3,
) -> dict[str, Any]:
    """Times (seconds, medians) of the kernels the step model is calibrated on; see the module docstring.

    GEMM ``(m, k, n)``: ``x.transpose(1, 2) @ y`` with ``x`` of shape ``(1, k, m)`` and ``y`` of ``(1, k, n)``, the
    form of the library's Gram products and preconditioning. Memory-bound op of ``n`` bytes: ``x * 0.5`` out of
    place (``bytes`` = read + written = 2n). im2col ``(batch, channels, side, kernel)``: ``F.unfold`` of a square
    input with "same" padding (``bytes`` = written). Finite check of ``n`` bytes: ``torch.isfinite(x).all()``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        gemm = []
        for m, k, n in gemm_sizes:
            a, b = torch.randn(1, k, m, generator=generator), torch.randn(1, k, n, generator=generator)
            seconds = _median_time(lambda x, y: x.transpose(1, 2) @ y, 15, a, b)
            gemm.append({"shape": [m, k, n], "flops": 2.0 * m * k * n, "seconds": seconds})
        copy, finite = [], []
        for size in copy_bytes:
            src = torch.randn(size // 4, generator=generator)
            copy.append({"bytes": 2 * size, "seconds": _median_time(torch.mul, 30, src, 0.5)})
            finite.append({"bytes": size, "seconds": _median_time(lambda x: torch.isfinite(x).all(), 30, src)})
        im2col = []
        for batch, channels, side, kernel in im2col_shapes:
            x = torch.randn(batch, channels, side, side, generator=generator)
            written = FLOAT_BYTES * batch * channels * kernel * kernel * side * side
            seconds = _median_time(F.unfold, 15, x, kernel, 1, kernel // 2)
            im2col.append({"shape": [batch, channels, side, kernel], "bytes": written, "seconds": seconds})
        eigh = []
        for side in eigh_sides:
            rows = torch.randn(2 * side, side, generator=generator)
            matrix = rows.T @ rows / side + 1e-3 * torch.eye(side)
            eigh.append({"n": side, "seconds": _median_time(torch.linalg.eigh, 5, matrix)})
        compute = {b: _compute_step(proxy, b, compute_steps, compute_blocks) for b in batches}
        return {"gemm": gemm, "copy": copy, "im2col": im2col, "finite": finite, "eigh": eigh, "compute": compute}
    finally:
        torch.set_num_threads(threads)


def _compute_step(proxy: ModelSpec, batch: int, steps: int, blocks: int) -> dict[str, float]:
    """Forward + backward and optimizer seconds per step at `batch` (one process, no communication)."""
    model = proxy.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = proxy.batch(batch)
    results: dict[str, list[float]] = {"forward_backward": [], "optimizer": []}
    for block in range(blocks + 1):
        fwd_bwd = opt = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            optimizer.step()
            fwd_bwd, opt = fwd_bwd + t1 - t0, opt + time.perf_counter() - t1
        if block:  # the first block warms up
            results["forward_backward"].append(fwd_bwd / steps)
            results["optimizer"].append(opt / steps)
    return {key: statistics.median(values) for key, values in results.items()}


def collective_worker(rank: int, world_size: int, sizes: list[int], reps: int) -> dict[str, dict[int, float]]:
    """Median seconds of allreduce, broadcast and reduce (root 0) of each size in bytes; barrier before each."""
    out: dict[str, dict[int, float]] = {}
    ops: dict[str, Callable[[torch.Tensor], object]] = {
        "allreduce": lambda t: dist.all_reduce(t),
        "broadcast": lambda t: dist.broadcast(t, src=0),
        "reduce": lambda t: dist.reduce(t, dst=0),
    }
    for name, op in ops.items():
        out[name] = {}
        for size in sizes:
            tensor = torch.ones(size // 4)
            times = []
            for rep in range(reps + 2):
                dist.barrier()
                start = time.perf_counter()
                op(tensor)
                if rep >= 2:
                    times.append(time.perf_counter() - start)
            out[name][size] = statistics.median(times)
    return out


def local_worker(
    rank: int, world_size: int, sizes: list[int], reps: int, tensor_counts: list[int], tiny_layers: int
) -> dict[str, Any]:
    """In one gloo process: :func:`collective_worker`, :func:`grad_sync_times` and :func:`tiny_phase_times`."""
    return {
        "collectives": collective_worker(rank, world_size, sizes, reps),
        "grad_sync": grad_sync_times(tensor_counts, reps),
        "tiny": tiny_phase_times(tiny_layers),
    }


def grad_sync_times(tensor_counts: list[int], reps: int) -> dict[int, float]:
    """Median seconds of :func:`~kfac_dist.app.bench.gloo_runs.average_gradients` on T tensors of 4 elements."""
    out = {}
    for count in tensor_counts:
        model = nn.ParameterList([nn.Parameter(torch.zeros(4)) for _ in range(count)])
        for param in model:
            param.grad = torch.ones(4)
        out[count] = _median_time(average_gradients, reps, model)
    return out


def tiny_phase_times(layers: int, steps: int = 10, blocks: int = 3) -> dict[str, float]:
    """K-FAC's phase seconds per layer and step on a stack of `layers` :data:`TINY_LAYER` convolutions.

    Factors and decompositions every step; the median over `blocks` blocks of `steps` steps after one untimed
    block. The kernels of a tiny layer cost little, so what is measured is mostly what a layer costs beyond them.
    """
    channels, side, batch = TINY_LAYER["channels"], TINY_LAYER["side"], TINY_LAYER["batch"]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(layers)])
    pre = KFACPreconditioner(model, lr=0.01, factor_update_steps=1, inv_update_steps=1, profile=True)
    x = torch.randn(batch, channels, side, side)
    results: dict[str, list[float]] = {}
    for block in range(blocks + 1):
        pre.reset_phase_times()
        for _ in range(steps):
            model.zero_grad()
            model(x).square().mean().backward()
            pre.step()
        if block:
            for phase, seconds in pre.phase_times().items():
                results.setdefault(phase, []).append(seconds / (steps * layers))
    return {phase: statistics.median(values) for phase, values in results.items()}


def _block(arm: Arm, block: Block) -> dict[str, Any]:
    """A block as the JSON stores it: the regions in the model's terms, the library's phases if profiled."""
    r = block.regions
    regions = {"forward": r["zero_grad"] + r["forward"], "backward": r["backward"], "grad_allreduce": r["grad_sync"]}
    regions |= {"kfac": r["kfac_step"], "optimizer": r["optimizer_step"], "factor_in_forward": r["factor_in_forward"]}
    out: dict[str, Any] = {"steps": block.steps, "wall": block.wall, "cpu": block.cpu, "regions": regions}
    if block.library:
        out["library"] = block.library
    if arm.pre is not None:
        out["health"] = arm.pre.health()
    return out


def scaling_worker(
    rank: int,
    world_size: int,
    proxy: ModelSpec,
    arms: list[ArmSpec],
    block_steps: int,
    warmup_steps: int,
    rotation: int,
    profile: bool,
    freq: tuple[int, int],
) -> dict[str, Any]:
    """One gloo launch: warm-up, one unprofiled block per arm (rotated order), then the profiled blocks."""
    initial = proxy.build()
    runs = []
    for spec in arms:
        generator = torch.Generator().manual_seed(1000 + rank)
        batches = [proxy.batch(spec.batch, generator) for _ in range(4)]
        kfac = KFACOptions(factor_update_steps=freq[0], inv_update_steps=freq[1]) if spec.optimizer == "kfac" else None
        runs.append(Arm(spec.name, copy.deepcopy(initial), batches, kfac, sync=average_gradients))
    for arm in runs:
        arm.run(warmup_steps)
    order = runs[rotation % len(runs) :] + runs[: rotation % len(runs)]
    blocks = {arm.name: _block(arm, arm.run(block_steps)) for arm in order}
    profiled: dict[str, Any] = {}
    if profile:
        for arm in runs:
            arm.rebuild(profile=True)
        profiled = {arm.name: _block(arm, arm.run(block_steps)) for arm in runs}
    return {
        "rank": rank,
        "order": [arm.name for arm in order],
        "blocks": blocks,
        "profiled": profiled,
        "arms": [asdict(spec) for spec in arms],
    }
