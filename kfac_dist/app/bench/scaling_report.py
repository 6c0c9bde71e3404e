"""The Markdown report (with its calibration tables) and the PNG of a ``kfac-dist bench scaling`` run.

Works on the in-memory results and on the JSON read back (integer keys become strings there).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfac_dist.app.bench.common import load_text, md_header, md_row, md_table
from kfac_dist.app.bench.scaling_model import FRACTIONS, PHASES
from kfac_dist.comm.accounting import collective_bytes

__all__ = ["BUSY", "OPTIMIZERS", "TOLERANCE", "efficiency", "markdown", "plot", "world_size_of"]

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
    head = ["kernel", "line", "per call (us)", "rate", "points"]
    return md_table(head, ([name, line, us(fit["intercept"]), r, points] for name, line, fit, r, points in rows))


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
    head = ["batch per rank", "forward + backward (ms)", "optimizer (ms)", "compute (ms)", "img/s"]
    body = []
    for batch, t in sorted(calibration["raw"]["compute"].items(), key=lambda item: int(item[0])):
        total = t["forward_backward"] + t["optimizer"]
        body.append([str(batch), ms(t["forward_backward"]), ms(t["optimizer"]), ms(total), rate(int(batch), total)])
    return md_table(head, body)


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


#: The issue's criterion: the model predicts the measured W = 1 and 2 step times within 15%.
TOLERANCE = 0.15
#: Below this CPU time / wall time, a process did not have a core to itself.
BUSY = 0.9
OPTIMIZERS = {"sgd": "SGD", "kfac": "K-FAC"}


def efficiency(global_batch: int, step_s: float, world_size: int, base_batch: int, base_s: float) -> float:
    """Scaling efficiency: throughput at `world_size` over `world_size` times the throughput at W = 1."""
    return (global_batch / step_s) / (world_size * base_batch / base_s)


# ------------------------------------------------------------------------------------------------ measured
def measured_table(measured: list[dict[str, Any]]) -> list[str]:
    """Per W and mode: median step times (rank 0), throughput, K-FAC / SGD and scaling efficiency vs W = 1."""
    head = ["mode", "W", "batch per rank", "global batch", "SGD ms/step", "K-FAC ms/step", "K-FAC / SGD"]
    head += ["SGD img/s", "K-FAC img/s", "SGD eff.", "K-FAC eff.", "per round SGD / K-FAC (ms)", "min busy"]
    lines = md_header(head)
    rows = {(r["mode"], r["optimizer"], r["world_size"]): r for r in measured}
    for mode in ("weak", "strong"):
        for world_size in sorted({w for m, _, w in rows if m == mode}):
            sgd, kfac = rows[(mode, "sgd", world_size)], rows[(mode, "kfac", world_size)]
            cells = [mode, str(world_size), str(sgd["batch"]), str(sgd["global_batch"])]
            cells += [ms(sgd["median_s"]), ms(kfac["median_s"]), f"{kfac['median_s'] / sgd['median_s']:.2f}x"]
            cells += [rate(r["global_batch"], r["median_s"]) for r in (sgd, kfac)]
            for r in (sgd, kfac):
                base = rows.get((mode, r["optimizer"], 1))
                if base is None:
                    cells.append("-")
                    continue
                eff = efficiency(r["global_batch"], r["median_s"], world_size, base["global_batch"], base["median_s"])
                cells.append(f"{eff:.2f}")
            rounds = [f"{ms(s)} / {ms(k)}" for s, k in zip(sgd["step_s"], kfac["step_s"], strict=True)]
            cells += ["; ".join(rounds), f"{min(sgd['min_busy'], kfac['min_busy']):.2f}"]
            lines.append(md_row(cells))
    return lines


def phase_table(measured: list[dict[str, Any]], validation: list[dict[str, Any]]) -> list[str]:
    """Per W and arm: the profiled phases (max over ranks) above the model's phases (ms per step)."""
    columns = [*PHASES, "unattributed"]
    lines = md_header(["W", "arm", "source", *(PHASE_TITLES[p] for p in columns), "step"])
    predicted = {(v["world_size"], v["mode"], v["optimizer"]): v["predicted_phases"] for v in validation}
    for row in measured:
        if "phases" not in row:
            continue
        key = (row["world_size"], row["mode"], row["optimizer"])
        arm = f"{row['mode']} {OPTIMIZERS[row['optimizer']]}"
        for source, phases in (("measured", row["phases"]), ("model", predicted.get(key))):
            if phases is None:
                continue
            cells = [str(row["world_size"]), arm, source]
            cells += [ms(phases[p]) if p in phases else "-" for p in columns]
            lines.append(md_row([*cells, ms(phases["step"])]))
    return lines


# ------------------------------------------------------------------------------------------------ model
def validation_table(validation: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[str]:
    """Predicted (calibrated gloo network, comm-opt) vs measured step time of every measured configuration.

    A run whose processes got less than :data:`BUSY` of a core (CPU time / wall time) is marked contended.
    """
    busy = {(r["world_size"], r["mode"], r["optimizer"]): r["min_busy"] for r in measured}
    head = ["W", "arm", "batch per rank", "measured ms/step", "model ms/step", "model / measured - 1", "min busy"]
    lines = md_header([*head, "verdict"])
    for v in validation:
        key = (v["world_size"], v["mode"], v["optimizer"])
        if v["validation_point"]:
            verdict = "pass" if abs(v["error"]) <= TOLERANCE else "**fail**"
            verdict += " (contended)" if busy[key] < BUSY else ""
        else:
            verdict = "not validated: oversubscribed"
        cells = [str(v["world_size"]), f"{v['mode']} {OPTIMIZERS[v['optimizer']]}", str(v["batch"])]
        cells += [ms(v["median_s"]), ms(v["predicted_s"]), pct(v["error"]), f"{busy[key]:.2f}", verdict]
        lines.append(md_row(cells))
    return lines


def verdict_line(validation: list[dict[str, Any]]) -> str:
    """One line: how many validation points are within :data:`TOLERANCE`, and the largest error."""
    points = [v for v in validation if v["validation_point"]]
    if not points:
        return "- Validation: no configuration at W <= 2 was measured."
    inside = sum(abs(v["error"]) <= TOLERANCE for v in points)
    worst = max(points, key=lambda v: abs(v["error"]))
    sizes = ", ".join(str(w) for w in sorted({v["world_size"] for v in points}))
    return (
        f"- **Validation (W = {sizes}): {inside} of {len(points)} predicted step times within "
        f"{100 * TOLERANCE:.0f}% of the measurement**; largest error {pct(worst['error'])} "
        f"(W = {worst['world_size']}, {worst['mode']} {OPTIMIZERS[worst['optimizer']]})."
    )


def prediction_table(rows: list[dict[str, Any]]) -> list[str]:
    """One network and mode: SGD and K-FAC (every fraction) step time, throughput, ratio and efficiency vs W = 1."""
    head = ["W", "batch per rank", "global batch", "SGD ms", "SGD img/s", "SGD eff."]
    for fraction in FRACTIONS:
        head += [f"K-FAC {fraction} ms", "/ SGD", "eff."]
    lines = md_header(head)
    base = next((r for r in rows if r["world_size"] == 1), None)
    for r in rows:
        w, gb = r["world_size"], r["global_batch"]
        cells = [str(w), str(r["batch"]), str(gb), ms(r["sgd_s"]), rate(gb, r["sgd_s"])]
        cells.append(f"{efficiency(gb, r['sgd_s'], w, base['global_batch'], base['sgd_s']):.2f}" if base else "-")
        for fraction in FRACTIONS:
            step = r["kfac"][fraction]["step_s"]
            cells += [ms(step), f"{step / r['sgd_s']:.2f}x"]
            if base:
                eff = efficiency(gb, step, w, base["global_batch"], base["kfac"][fraction]["step_s"])
                cells.append(f"{eff:.2f}")
            else:
                cells.append("-")
        lines.append(md_row(cells))
    return lines


def largest_w_phase_table(predictions: list[dict[str, Any]]) -> list[str]:
    """The predicted amortised K-FAC phases at the largest W of each network and mode (ms per step)."""
    lines = md_header(["network", "mode", "W", "fraction", *(PHASE_TITLES[p] for p in PHASES), "step"])
    groups = dict.fromkeys((r["network"], r["mode"]) for r in predictions)
    for network, mode in groups:
        last = _series(predictions, network, mode)[-1]
        for fraction, k in last["kfac"].items():
            cells = [network, mode, str(last["world_size"]), fraction, *(ms(k["phases"][p]) for p in PHASES)]
            lines.append(md_row([*cells, ms(k["step_s"])]))
    return lines


def health_lines(measured: list[dict[str, Any]]) -> list[str]:
    """Numerical fallbacks of the K-FAC runs (``pre.health()`` of rank 0, whole launch), if any."""
    lines = [
        f"- W = {r['world_size']}, {r['mode']} K-FAC: " + ", ".join(f"{k} {v}" for k, v in r["health"].items() if v)
        for r in measured
        if any(r.get("health", {}).values())
    ]
    if not lines:
        return []
    head = "Numerical fallbacks (rank 0, whole launch; the model prices every decomposition once, in float32):"
    return [head, "", *lines, ""]


def _strong_range(predictions: list[dict[str, Any]]) -> str:
    batches = [r["batch"] for r in predictions if r["mode"] == "strong"]
    return f"{max(batches)} down to {min(batches)}" if batches else "-"


def world_size_of(row: Mapping[str, Any]) -> int:
    """A row's world size (an int also when read back from JSON)."""
    return int(row["world_size"])


def _series(predictions: list[dict[str, Any]], network: str, mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in predictions if (r["network"], r["mode"]) == (network, mode)), key=world_size_of)


def markdown(results: dict[str, Any]) -> str:
    """The whole Markdown report."""
    meta, calibration = results.get("meta", {}), results["calibration"]
    settings = meta.get("settings", {})
    freq = tuple(settings.get("freq", (10, 100)))
    lines = ["# Scaling: gloo runs at small W and a calibrated alpha-beta model to W = 1024", ""]
    if meta:
        loads = load_text(meta["load_average_before_after"])
        lines += [
            f"- Date: {meta['date']}. Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread per "
            f"process. Wall time: {meta['wall_seconds'] / 60:.1f} min; load average before / after: {loads}.",
            f"- Command: `{meta['command']}`",
        ]
    if settings:
        proxy = settings["proxy"]
        lines.append(
            f"- Proxy: `{proxy['builder']}` with `{proxy['kwargs']}` on {proxy['input_shape']} inputs; SGD momentum "
            f"0.9, K-FAC with factors every {freq[0]} and decompositions every {freq[1]} steps (library defaults "
            f"otherwise, comm-opt); {settings['rounds']} round(s) of {settings['block_steps']}-step blocks per arm "
            f"after {settings['warmup_steps']} warm-up steps."
        )
    lines += [
        verdict_line(results["validation"]),
        "",
        "## Measured (real gloo processes, 1 thread each, rank 0's wall time)",
        "",
        "Median step time over rounds of unprofiled blocks. Efficiency = throughput / (W x throughput at W = 1) "
        "of the same arm. W = 4 runs 4 processes on the machine's cores: oversubscribed where the machine has fewer.",
        "",
        *measured_table(results["measured"]),
        "",
        *health_lines(results["measured"]),
        "## Phases (profiled blocks, max over ranks) beside the model (ms per step)",
        "",
        "Measured: K-FAC's `profile=True` phase times; compute = forward + backward + optimizer minus factor "
        "computation (which runs in the hooks); unattributed = the measured step minus the named phases. Model: "
        f"the calibrated gloo network, amortised over ({freq[0]}, {freq[1]}).",
        "",
        *phase_table(results["measured"], results["validation"]),
        "",
        "## Calibration",
        "",
        "Kernel lines (one process, 1 thread; least squares in relative error):",
        "",
        *kernel_table(calibration),
        "",
        *kernel_points_table(calibration),
        "",
        "What the library costs beyond the kernels it is modelled by (Python, view ops), measured in one gloo "
        "process: K-FAC's phases per layer on a stack of tiny 3x3 convolutions (factors and decompositions every "
        "step), minus the kernel lines' time for such a layer (clipped at 0); and `average_gradients` on T tiny "
        "tensors, the slope in T minus one copy call per tensor.",
        "",
        *overhead_table(calibration),
        "",
        "The proxy's compute per step (the model's compute phase; W = 1, no communication):",
        "",
        *compute_table(calibration),
        "",
        "Networks: a collective over g ranks takes alpha x ceil(log2 g) + beta x (bytes the busiest member sends or "
        "receives, bandwidth-optimal accounting). The gloo line is fitted to 2 processes over loopback; the other "
        "network is assumed, not measured.",
        "",
        *network_table(calibration["networks"]),
        "",
        *collective_table(calibration),
        "",
        "## Validation: model vs measurement (calibrated gloo network, comm-opt)",
        "",
        *validation_table(results["validation"], results["measured"]),
        "",
        "## Predictions",
        "",
        "Step times amortised over the schedule; K-FAC / SGD is the step-time ratio; eff. = throughput / (W x "
        "throughput at W = 1) of the same method; K-FAC's can exceed 1, as one rank does all the K-FAC work that "
        "more ranks share. comm-opt: every rank preconditions every layer (f = 1); hybrid-opt: f = 0.5; mem-opt: "
        "f = 1/W (the owner preconditions and broadcasts the gradient). Compute per step comes from the batches "
        "measured in the calibration, linear in between and beyond (strong scaling runs from "
        f"{_strong_range(results['predictions'])} images per rank).",
        "",
    ]
    for network in dict.fromkeys(r["network"] for r in results["predictions"]):
        for mode in ("weak", "strong"):
            rows = _series(results["predictions"], network, mode)
            if rows:
                lines += [f"### {network}, {mode} scaling", "", *prediction_table(rows), ""]
    lines += [
        "### Predicted K-FAC phases at the largest W (ms per step, amortised)",
        "",
        *largest_w_phase_table(results["predictions"]),
        "",
    ]
    return "\n".join(lines)


COLORS = {"sgd": "black", "comm-opt": "#55a868", "hybrid-opt": "#4c72b0", "mem-opt": "#c44e52"}
STYLES = ("--", "-")  # calibrated gloo network, assumed network


def plot(results: dict[str, Any], out: Path) -> Path:
    """Predicted throughput vs W (log-log), weak and strong scaling, with the measurements; writes ``<out>.png``.

    Lines: SGD (black) and K-FAC per grad-worker fraction, dashed for the calibrated gloo network and solid for
    the assumed one. Filled markers: measured throughput; open markers: the model at the measured configurations.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    networks = list(dict.fromkeys(r["network"] for r in results["predictions"]))
    for ax, mode in zip(axes, ("weak", "strong"), strict=True):
        for style, network in zip(STYLES, networks, strict=False):
            rows = _series(results["predictions"], network, mode)
            sizes = [r["world_size"] for r in rows]
            series = {"sgd": [r["global_batch"] / r["sgd_s"] for r in rows]}
            series |= {f: [r["global_batch"] / r["kfac"][f]["step_s"] for r in rows] for f in FRACTIONS}
            for name, values in series.items():
                label = f"{'SGD' if name == 'sgd' else 'K-FAC ' + name}, {network}"
                ax.plot(sizes, values, linestyle=style, color=COLORS[name], label=label, linewidth=1.2)
        for optimizer, color in (("sgd", COLORS["sgd"]), ("kfac", COLORS["comm-opt"])):
            measured = [r for r in results["measured"] if (r["mode"], r["optimizer"]) == (mode, optimizer)]
            model = [v for v in results["validation"] if (v["mode"], v["optimizer"]) == (mode, optimizer)]
            ax.plot([r["world_size"] for r in measured], [r["global_batch"] / r["median_s"] for r in measured],
                    "o", color=color, markersize=7, label=f"measured {OPTIMIZERS[optimizer]}")  # fmt: skip
            ax.plot([v["world_size"] for v in model], [v["global_batch"] / v["predicted_s"] for v in model],
                    "o", color=color, markerfacecolor="none", markersize=11,
                    label=f"model at the measured configuration, {OPTIMIZERS[optimizer]}")  # fmt: skip
        batches = sorted({r["global_batch"] for r in results["measured"] if r["mode"] == mode})
        title = f"{mode} scaling: measured global batch {', '.join(map(str, batches))}"
        if mode == "strong":
            predicted = sorted({r["global_batch"] for r in results["predictions"] if r["mode"] == mode})
            title += f"; predicted {', '.join(map(str, predicted))}"
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("world size W")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle("Predicted throughput (lines) and gloo measurements (markers)", fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
