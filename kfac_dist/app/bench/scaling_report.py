"""The Markdown report of a ``kfac-dist bench scaling`` run (:func:`kfac_dist.app.bench.scaling.run`).

Calibration tables: :mod:`kfac_dist.app.bench.scaling_calibration_report`; the PNG:
:mod:`kfac_dist.app.bench.scaling_plot`.

Works on the in-memory results and on the JSON read back (integer keys become strings there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kfac_dist.app.bench.common import md_header, md_row
from kfac_dist.app.bench.scaling import FRACTIONS
from kfac_dist.app.bench.scaling_calibration_report import (
    PHASE_TITLES,
    collective_table,
    compute_table,
    kernel_points_table,
    kernel_table,
    ms,
    network_table,
    overhead_table,
    pct,
    rate,
)
from kfac_dist.app.bench.scaling_model import PHASES

__all__ = ["BUSY", "OPTIMIZERS", "TOLERANCE", "efficiency", "markdown", "world_size_of"]

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
        last = max((r for r in predictions if (r["network"], r["mode"]) == (network, mode)), key=world_size_of)
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


def markdown(results: dict[str, Any]) -> str:
    """The whole Markdown report."""
    meta, calibration = results.get("meta", {}), results["calibration"]
    settings = meta.get("settings", {})
    freq = tuple(settings.get("freq", (10, 100)))
    lines = ["# Scaling: gloo runs at small W and a calibrated alpha-beta model to W = 1024", ""]
    if meta:
        loads = " / ".join(", ".join(f"{x:.1f}" for x in triple) for triple in meta["load_average_before_after"])
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
            rows = sorted(
                (r for r in results["predictions"] if (r["network"], r["mode"]) == (network, mode)), key=world_size_of
            )
            if rows:
                lines += [f"### {network}, {mode} scaling", "", *prediction_table(rows), ""]
    lines += [
        "### Predicted K-FAC phases at the largest W (ms per step, amortised)",
        "",
        *largest_w_phase_table(results["predictions"]),
        "",
    ]
    return "\n".join(lines)
