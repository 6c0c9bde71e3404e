"""Scaling benchmark: real gloo runs at W = 1, 2, 4 and an alpha-beta model that predicts W up to 1024.

Protocol: docs/BENCHMARKS.md section 4.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kfac_dist.app.bench.common import PROXY, Log, ModelSpec, positive_int
from kfac_dist.app.bench.gloo_runs import BENCH_LIMITS
from kfac_dist.app.bench.overhead_flops import model_layers
from kfac_dist.app.bench.scaling_model import (
    FRACTIONS,
    KFAC_PHASES,
    Kernels,
    Network,
    StepLayer,
    StepModel,
    fit_line,
    predict_kfac,
    predict_sgd,
)
from kfac_dist.app.bench.scaling_runs import (
    TINY_LAYER,
    ArmSpec,
    collective_worker,
    local_worker,
    measure_kernels,
    scaling_worker,
)
from kfac_dist.app.processes import run_gloo
from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.placement import LayerShape
from kfac_dist.work import LAYER_PHASES

__all__ = ["FULL", "IB_NETWORK", "Settings", "add_arguments", "run", "run_benchmark"]

FULL = "the docs/ run: 3 rounds"
#: Assumed (not measured here): one HDR InfiniBand link per rank, 200 Gb/s = 25 GB/s per direction, of which
#: about 23 GB/s is reached by NCCL's bus bandwidth; 5 us per message, two messages per log2 level. A collective
#: over one rank is taken as free (NCCL copies on the device at most).
IB_NETWORK = Network(
    "NCCL/InfiniBand-like (assumed)",
    alpha=dict.fromkeys(("allreduce", "reduce", "broadcast"), 10e-6),
    beta=dict.fromkeys(("allreduce", "reduce", "broadcast"), 1.0 / 23e9),
    source="assumed: HDR InfiniBand 200 Gb/s per rank (~23 GB/s achieved), 5 us per message",
)


@dataclass
class Settings:
    """Everything a benchmark run depends on (stored in the JSON)."""

    proxy: ModelSpec = PROXY
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    weak_batch: int = 32
    strong_global: int = 64
    block_steps: int = 100
    warmup_steps: int = 5
    rounds: int = 1
    freq: tuple[int, int] = (10, 100)
    gemm_sizes: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (64, 2048, 64),
                                 (256, 512, 256)]
    )  # fmt: skip
    copy_bytes: list[int] = field(default_factory=lambda: [2**k for k in (10, 13, 16, 19, 22, 24)])
    im2col_shapes: list[tuple[int, int, int, int]] = field(
        default_factory=lambda: [(2, 8, 8, 3), (32, 8, 8, 3), (32, 16, 4, 3), (32, 8, 16, 3), (32, 3, 32, 7)]
    )
    eigh_sides: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    collective_bytes: list[int] = field(default_factory=lambda: [2**k for k in (12, 16, 18, 20, 22, 24)])
    collective_reps: int = 10
    compute_batches: list[int] = field(default_factory=lambda: [2, 4, 16, 64, 256])  # BatchNorm trains on >= 2
    tensor_counts: list[int] = field(default_factory=lambda: [16, 64, 256])
    tiny_layers: int = 16
    predict_world_sizes: list[int] = field(default_factory=lambda: [2**k for k in range(11)])
    predict_strong_global: int = 2048  # 2 images per rank at W = 1024
    threads: int = 1

    def arms(self, world_size: int) -> list[ArmSpec]:
        """The arms of a launch at `world_size`: weak and strong scaling, SGD and K-FAC."""
        strong = max(1, self.strong_global // world_size)
        return [ArmSpec(m, o, b) for m, b in (("weak", self.weak_batch), ("strong", strong)) for o in ("sgd", "kfac")]


# ------------------------------------------------------------------------------------------------ calibration
def kernels_from(raw: dict[str, Any]) -> Kernels:
    """Fit the kernel lines to the raw times of :func:`~kfac_dist.app.bench.scaling_runs.measure_kernels`."""
    compute = {int(b): v["forward_backward"] + v["optimizer"] for b, v in raw["compute"].items()}
    return Kernels(
        gemm=fit_line([g["flops"] for g in raw["gemm"]], [g["seconds"] for g in raw["gemm"]]),
        copy=fit_line([c["bytes"] for c in raw["copy"]], [c["seconds"] for c in raw["copy"]]),
        im2col=fit_line([c["bytes"] for c in raw["im2col"]], [c["seconds"] for c in raw["im2col"]]),
        finite=fit_line([c["bytes"] for c in raw["finite"]], [c["seconds"] for c in raw["finite"]]),
        eigh=fit_line([float(e["n"]) ** 3 for e in raw["eigh"]], [e["seconds"] for e in raw["eigh"]]),
        compute=compute,
    )


def overheads_from(local: dict[str, Any], kernels: Kernels) -> Kernels:
    """`kernels` with the library's costs beyond them, from :func:`~kfac_dist.app.bench.scaling_runs.local_worker`.

    Per gradient tensor: the slope of ``average_gradients`` in T minus one copy call. Per layer and phase: the tiny
    layers' measured phases minus their kernel model. Both clipped at 0.
    """
    counts = sorted(int(t) for t in local["grad_sync"])
    times = {int(t): s for t, s in local["grad_sync"].items()}
    per_tensor = fit_line(counts, [times[t] for t in counts]).slope - kernels.copy.intercept
    channels, side, batch = TINY_LAYER["channels"], TINY_LAYER["side"], TINY_LAYER["batch"]
    tiny = StepLayer(LayerShape("tiny", 9 * channels, channels, grad_numel=9 * channels**2), side**2, unfold=True)
    overhead = {
        phase: max(0.0, local["tiny"][phase] - kernels.seconds(tiny.work(phase, batch))) for phase in LAYER_PHASES
    }
    return replace(kernels, layer_overhead=overhead, tensor_overhead=max(0.0, per_tensor))


def network_from(raw: dict[str, dict[int, float]], local: dict[str, dict[int, float]], world_size: int = 2) -> Network:
    """The calibrated gloo network, from collective times at `world_size` and at W = 1 (`local`).

    Alpha and beta per op are fitted against the busiest member's bytes, the local line against the message's
    bytes; negative fitted terms are clipped to 0.
    """
    alpha, beta, local_alpha, local_beta = {}, {}, {}, {}
    group = range(world_size)
    levels = max(1, (world_size - 1).bit_length())
    for op, times in raw.items():
        sizes = sorted(int(n) for n in times)
        root = None if op == "allreduce" else 0
        busiest = [max(max(collective_bytes(op, n, group, r, root)) for r in group) for n in sizes]
        fit = fit_line(busiest, [times[n] for n in sizes])
        alpha[op], beta[op] = max(fit.intercept, 0.0) / levels, max(fit.slope, 0.0)
    for op, times in local.items():
        sizes = sorted(int(n) for n in times)
        fit = fit_line(sizes, [times[n] for n in sizes])
        local_alpha[op], local_beta[op] = max(fit.intercept, 0.0), max(fit.slope, 0.0)
    source = f"fitted to gloo collectives at W={world_size} (one rank: at W=1)"
    return Network("gloo loopback (calibrated)", alpha, beta, source, local_alpha, local_beta)


def step_model(proxy: ModelSpec, freq: tuple[int, int]) -> StepModel:
    """The proxy as the step model sees it (meta device: nothing allocated)."""
    layers = model_layers(proxy, 2)  # batch 2: BatchNorm needs > 1
    params = list(proxy.build_meta().parameters())
    return StepModel(
        name=f"{proxy.builder} {proxy.kwargs}",
        layers=tuple(StepLayer(x.shape, x.rows // 2, x.unfold) for x in layers),
        param_tensors=len(params),
        param_numel=sum(p.numel() for p in params),
        freq=freq,
    )


# ------------------------------------------------------------------------------------------------ runs
def per_step(block: dict[str, Any]) -> float:
    """Seconds per step of a block."""
    return float(block["wall"]) / int(block["steps"])


def measured_phases(block: dict[str, Any]) -> dict[str, float]:
    """A profiled block in the model's phases (seconds per step); "unattributed" is what no phase covers."""
    steps, regions, library = block["steps"], block["regions"], block.get("library", {})
    compute = regions["forward"] + regions["backward"] + regions["optimizer"] - library.get("factor_computation", 0)
    phases = {"compute": compute / steps, "grad_allreduce": regions["grad_allreduce"] / steps}
    phases |= {p: library.get(p, 0.0) / steps for p in KFAC_PHASES}
    phases["unattributed"] = per_step(block) - sum(phases.values())
    return phases | {"step": per_step(block)}


def aggregate(launches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per W and arm: step times of every round (rank 0), their median, busy ratio, profiled phases."""
    rows = []
    for world_size in sorted({launch["world_size"] for launch in launches}):
        mine = [launch for launch in launches if launch["world_size"] == world_size]
        for arm in mine[0]["ranks"][0]["arms"]:
            name = f"{arm['mode']}/{arm['optimizer']}"
            steps = [per_step(launch["ranks"][0]["blocks"][name]) for launch in mine]
            busy = min(b["cpu"] / b["wall"] for launch in mine for r in launch["ranks"] for b in [r["blocks"][name]])
            row: dict[str, Any] = {"world_size": world_size, **arm, "global_batch": arm["batch"] * world_size}
            row |= {"step_s": steps, "median_s": statistics.median(steps), "min_busy": busy}
            profiled = [r["profiled"][name] for launch in mine for r in launch["ranks"] if r["profiled"]]
            if profiled:
                per_rank = [measured_phases(b) for b in profiled]
                row["phases"] = {p: max(ph[p] for ph in per_rank) for p in per_rank[0]}
                row["health"] = profiled[0].get("health", {})
            rows.append(row)
    return rows


def predicted_step(
    model: StepModel, kernels: Kernels, network: Network, world_size: int, batch: int, optimizer: str, fraction: str
) -> dict[str, float]:
    """Amortised predicted phases (seconds per step) of one configuration."""
    if optimizer == "sgd":
        return predict_sgd(model, world_size, batch, kernels, network)
    f = FRACTIONS[fraction](world_size)
    return predict_kfac(model, world_size, batch, kernels, network, fraction=f)["amortised"]


def validation(measured: list[dict[str, Any]], model: StepModel, kernels: Kernels, network: Network) -> list[Any]:
    """Predicted vs measured step time of every measured configuration (the runs use comm-opt)."""
    rows = []
    for row in measured:
        w, batch, optimizer = row["world_size"], row["batch"], row["optimizer"]
        predicted = predicted_step(model, kernels, network, w, batch, optimizer, "comm-opt")
        entry = {k: row[k] for k in ("world_size", "mode", "optimizer", "batch", "global_batch", "median_s")}
        entry |= {"predicted_s": predicted["step"], "error": predicted["step"] / row["median_s"] - 1.0}
        entry |= {"predicted_phases": predicted, "validation_point": row["world_size"] <= 2}
        rows.append(entry)
    return rows


def predictions(settings: Settings, model: StepModel, kernels: Kernels, networks: list[Network]) -> list[Any]:
    """Predicted step times and throughput over ``predict_world_sizes``: weak and strong scaling, SGD and K-FAC."""
    rows = []
    for network in networks:
        for mode in ("weak", "strong"):
            for world_size in settings.predict_world_sizes:
                batch = settings.weak_batch if mode == "weak" else settings.predict_strong_global // world_size
                if batch < 1:
                    continue
                sgd = predict_sgd(model, world_size, batch, kernels, network)
                row: dict[str, Any] = {"network": network.name, "mode": mode, "world_size": world_size}
                row |= {"batch": batch, "global_batch": batch * world_size, "sgd_s": sgd["step"], "kfac": {}}
                for fraction in FRACTIONS:
                    phases = predicted_step(model, kernels, network, world_size, batch, "kfac", fraction)
                    row["kfac"][fraction] = {"step_s": phases["step"], "phases": phases}
                rows.append(row)
    return rows


def run_benchmark(settings: Settings, log: Log = print) -> dict[str, Any]:
    """Calibrate, run, model; returns the results dict (JSON-ready, without ``meta``)."""
    log("kernel calibration (1 thread)")
    batches = {arm.batch for w in settings.world_sizes for arm in settings.arms(w)} | set(settings.compute_batches)
    sizes = (settings.gemm_sizes, settings.copy_bytes, settings.im2col_shapes, settings.eigh_sides)
    raw_kernels = measure_kernels(settings.proxy, sorted(batches), *sizes)
    log("network calibration (gloo, W=2 and W=1)")
    raw_net = run_gloo(collective_worker, 2, settings.collective_bytes, settings.collective_reps, **BENCH_LIMITS)
    net_times = {op: {n: max(r[op][n] for r in raw_net) for n in raw_net[0][op]} for op in raw_net[0]}
    local_args = (settings.collective_bytes, settings.collective_reps, settings.tensor_counts, settings.tiny_layers)
    local = run_gloo(local_worker, 1, *local_args, **BENCH_LIMITS)[0]
    launches = []
    for round_ in range(settings.rounds):
        shift = round_ % len(settings.world_sizes)
        for world_size in settings.world_sizes[shift:] + settings.world_sizes[:shift]:
            started = time.perf_counter()
            arms = settings.arms(world_size)
            args = (settings.proxy, arms, settings.block_steps, settings.warmup_steps, round_, round_ == 0)
            ranks = run_gloo(scaling_worker, world_size, *args, settings.freq, **BENCH_LIMITS)
            launches.append({"world_size": world_size, "round": round_, "ranks": ranks})
            steps = ", ".join(f"{a.name} {1e3 * per_step(ranks[0]['blocks'][a.name]):.1f} ms" for a in arms)
            seconds = time.perf_counter() - started
            log(f"  round {round_ + 1}/{settings.rounds} W={world_size}: {steps} ({seconds:.0f} s)")
    kernels = overheads_from(local, kernels_from(raw_kernels))
    gloo = network_from(net_times, local["collectives"])
    model = step_model(settings.proxy, settings.freq)
    measured = aggregate(launches)
    return {
        "calibration": {
            "raw": raw_kernels,
            "collectives_s": net_times,
            "local_collectives_s": local["collectives"],
            "grad_sync_s": local["grad_sync"],
            "tiny_phases_s": local["tiny"],
            "kernels": {k: asdict(getattr(kernels, k)) for k in ("gemm", "copy", "im2col", "finite", "eigh")},
            "layer_overhead_s": dict(kernels.layer_overhead),
            "tensor_overhead_s": kernels.tensor_overhead,
            "compute_s": dict(kernels.compute),
            "networks": [asdict(gloo), asdict(IB_NETWORK)],
        },
        "measured": measured,
        "validation": validation(measured, model, kernels, gloo),
        "predictions": predictions(settings, model, kernels, [gloo, IB_NETWORK]),
        "launches": launches,
    }


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench scaling``."""
    parser.add_argument("--world-sizes", nargs="+", type=positive_int, default=[1, 2, 4], help="real gloo runs at W")
    parser.add_argument("--weak-batch", type=positive_int, default=32, help="per-rank batch of weak scaling")
    parser.add_argument("--strong-global", type=positive_int, default=64, help="global batch of strong scaling")
    parser.add_argument("--block-steps", type=positive_int, default=100, help="steps per timed block")
    parser.add_argument("--warmup-steps", type=positive_int, default=5, help="untimed steps per arm and launch")
    parser.add_argument("--rounds", type=positive_int, help="rounds (default 1; --full 3)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings of parsed options."""
    return Settings(
        world_sizes=list(args.world_sizes),
        weak_batch=args.weak_batch,
        strong_global=args.strong_global,
        block_steps=args.block_steps,
        warmup_steps=args.warmup_steps,
        rounds=args.rounds or (3 if args.full else 1),
    )


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the benchmark of parsed options; the results and the settings."""
    settings = settings_from_args(args)
    return run_benchmark(settings, log), asdict(settings)
