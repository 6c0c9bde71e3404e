"""The calibration section of the ``kfac-dist bench scaling`` report, and the number formats of its tables."""

from __future__ import annotations

from typing import Any

from kfac_dist.app.bench.common import md_header, md_row
from kfac_dist.comm.accounting import collective_bytes

__all__ = [
    "PHASE_TITLES",
    "collective_table",
    "compute_table",
    "kernel_points_table",
    "kernel_table",
    "ms",
    "network_table",
    "overhead_table",
    "pct",
    "rate",
    "us",
]

#: Column titles of the phases.
PHASE_TITLES = {
    "compute": "compute",
    "grad_allreduce": "grad allreduce",
    "factor_computation": "factors",
    "factor_communication": "factor comm",
    "factor_update": "factor update",
    "decomposition": "decomp",
    "decomposition_broadcast": "decomp bcast",
    "preconditioning": "precond",
    "gradient_broadcast": "grad bcast",
    "kl_clip": "KL clip",
    "unattributed": "unattributed",
}


def ms(seconds: float) -> str:
    """Seconds as milliseconds, 3 significant digits (thousands separated from 100 ms)."""
    value = 1e3 * seconds
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def us(seconds: float) -> str:
    """Seconds as microseconds, 3 significant digits."""
    return f"{1e6 * seconds:.3g}"


def rate(items: float, seconds: float) -> str:
    """Items per second, 3 significant digits (thousands separated from 1,000)."""
    value = items / seconds
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def pct(fraction: float) -> str:
    """A signed percentage with one decimal."""
    return f"{100 * fraction:+.1f}%"


def kernel_table(calibration: dict[str, Any]) -> list[str]:
    """The fitted kernel lines: per-call time and rate."""
    fits, raw = calibration["kernels"], calibration["raw"]
    gemm, copy, im2col = fits["gemm"], fits["copy"], fits["im2col"]
    finite, eigh = fits["finite"], fits["eigh"]
    rows = [
        ["GEMM (batched x^T @ y)", "t = t_call + FLOPs / rate", gemm, f"{1e-9 / gemm['slope']:.3g} GFLOP/s"]
        + [", ".join("x".join(map(str, g["shape"])) for g in raw["gemm"])],
        ["memory-bound op (x * 0.5)", "t = t_call + bytes / bandwidth", copy, f"{1e-9 / copy['slope']:.3g} GB/s"]
        + [", ".join(f"{c['bytes'] // 2:,} B" for c in raw["copy"])],
        ["im2col (F.unfold)", "t = t_call + bytes written / rate", im2col, f"{1e-9 / im2col['slope']:.3g} GB/s"]
        + [", ".join("x".join(map(str, c["shape"])) for c in raw["im2col"])],
        ["isfinite(t).all()", "t = t_call + bytes / rate", finite, f"{1e-9 / finite['slope']:.3g} GB/s"]
        + [", ".join(f"{c['bytes']:,} B" for c in raw["finite"])],
        ["eigh (with vectors)", "t = t0 + c n^3", eigh, f"c = {1e9 * eigh['slope']:.3g} ns"]
        + ["n = " + ", ".join(str(e["n"]) for e in raw["eigh"])],
    ]
    lines = md_header(["kernel", "line", "per call (us)", "rate", "points"])
    for name, line, fit, rate, points in rows:
        lines.append(md_row([name, line, us(fit["intercept"]), rate, points]))
    return lines


def kernel_points_table(calibration: dict[str, Any]) -> list[str]:
    """Every calibration point beside its fitted line (how well a line describes the kernel)."""
    fits, raw = calibration["kernels"], calibration["raw"]
    lines = md_header(["kernel", "size", "measured (us)", "line (us)", "line / measured"])
    points = [("GEMM", "x".join(map(str, g["shape"])), g["flops"], g["seconds"], "gemm") for g in raw["gemm"]]
    points += [("copy", f"{c['bytes'] // 2:,} B", c["bytes"], c["seconds"], "copy") for c in raw["copy"]]
    points += [("im2col", "x".join(map(str, c["shape"])), c["bytes"], c["seconds"], "im2col") for c in raw["im2col"]]
    points += [("isfinite", f"{c['bytes']:,} B", c["bytes"], c["seconds"], "finite") for c in raw["finite"]]
    points += [("eigh", f"n = {e['n']}", float(e["n"]) ** 3, e["seconds"], "eigh") for e in raw["eigh"]]
    for name, size, x, seconds, fit in points:
        line = fits[fit]["intercept"] + fits[fit]["slope"] * x
        lines.append(md_row([name, size, us(seconds), us(line), f"{line / seconds:.2f}"]))
    return lines


def overhead_table(calibration: dict[str, Any]) -> list[str]:
    """What the library costs beyond its counted kernels: per layer and phase, and per gradient tensor."""
    tiny, overhead = calibration["tiny_phases_s"], calibration["layer_overhead_s"]
    lines = md_header(["cost", "measured (us)", "used by the model (us)"])
    for phase, seconds in overhead.items():
        lines.append(md_row([f"{PHASE_TITLES[phase]}, per layer", us(tiny[phase]), us(seconds)]))
    sync = sorted(calibration["grad_sync_s"].items(), key=lambda item: int(item[0]))
    measured = ", ".join(f"{us(seconds)} at T = {count}" for count, seconds in sync)
    lines.append(md_row(["gradient allreduce, per tensor", measured, us(calibration["tensor_overhead_s"])]))
    return lines


def compute_table(calibration: dict[str, Any]) -> list[str]:
    """The proxy's forward + backward and optimizer step per per-rank batch (one process, W = 1 compute)."""
    lines = md_header(["batch per rank", "forward + backward (ms)", "optimizer (ms)", "compute (ms)", "img/s"])
    for batch, times in sorted(calibration["raw"]["compute"].items(), key=lambda item: int(item[0])):
        total = times["forward_backward"] + times["optimizer"]
        lines.append(
            md_row(
                [
                    str(batch),
                    ms(times["forward_backward"]),
                    ms(times["optimizer"]),
                    ms(total),
                    rate(int(batch), total),
                ]
            )
        )
    return lines


def network_table(networks: list[dict[str, Any]]) -> list[str]:
    """Alpha (per log2 level) and beta (as a bandwidth) per collective of each network."""
    lines = md_header(["network", "op", "alpha (us per level)", "1 / beta (GB/s)", "one rank: us + GB/s", "source"])
    for net in networks:
        for op in sorted(net["alpha"]):
            local_alpha, local_beta = net["local_alpha"].get(op, 0.0), net["local_beta"].get(op, 0.0)
            local = f"{us(local_alpha)} + {_bandwidth(local_beta)}" if local_alpha or local_beta else "free"
            cells = [net["name"], op, us(net["alpha"][op]), _bandwidth(net["beta"][op]), local, net["source"]]
            lines.append(md_row(cells))
    return lines


def _bandwidth(seconds_per_byte: float) -> str:
    return f"{1e-9 / seconds_per_byte:.3g}" if seconds_per_byte > 0 else "inf"


def collective_table(calibration: dict[str, Any]) -> list[str]:
    """The measured gloo collectives at W = 2 and W = 1 beside the calibrated network's lines."""
    gloo = calibration["networks"][0]
    head = ["W", "op", "bytes", "busiest member moves (bytes)", "measured (us)", "model (us)", "model / measured"]
    lines = md_header(head)
    for world_size, key in ((2, "collectives_s"), (1, "local_collectives_s")):
        group = range(world_size)
        for op, times in calibration[key].items():
            for size, seconds in sorted(times.items(), key=lambda item: int(item[0])):
                root = None if op == "allreduce" else 0
                busiest = max(max(collective_bytes(op, int(size), group, r, root)) for r in group)
                if world_size == 1:
                    model = gloo["local_alpha"][op] + gloo["local_beta"][op] * int(size)
                else:
                    model = gloo["alpha"][op] + gloo["beta"][op] * busiest
                cells = [str(world_size), op, f"{int(size):,}", f"{busiest:,}", us(seconds), us(model)]
                lines.append(md_row([*cells, f"{model / seconds:.2f}"]))
    return lines
