"""Markdown tables and the PNG of an overhead benchmark's results: the CPU protocol's or the device protocol's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfac_dist.app.bench.common import load_text, md_table
from kfac_dist.app.bench.operators_report import kinds_table
from kfac_dist.app.bench.overhead_runs import PHASES
from kfac_dist.methods import EIGH_FLOPS_PER_N3

__all__ = ["TARGET", "markdown", "operators_section", "plot"]

#: The issue's target: on the ResNet-50 proxy at frequencies (10, 100), K-FAC's step <= 1.15x SGD's.
TARGET_MODEL, TARGET_FREQ, TARGET = "ResNet-50 proxy", [10, 100], 1.15
#: Column title and bar colour of each phase.
PHASE_STYLE = {
    "forward": ("fwd", "#4c72b0"),
    "backward": ("bwd", "#8da0cb"),
    "factor_computation": ("factors", "#dd8452"),
    "factor_communication": ("factor comm", "#937860"),
    "decomposition": ("decomp", "#c44e52"),
    "preconditioning": ("precond", "#55a868"),
    "gradient_broadcast": ("grad bcast", "#8172b3"),
    "other": ("other", "#bbbbbb"),
}


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _phases(phases: dict[str, float]) -> list[str]:
    return [_ms(phases[name]) for name in PHASES]


def results_table(results: dict[str, Any]) -> list[str]:
    """Model x frequency x method: step times, ratios and the phase breakdown (ms per step)."""
    head = ["model", "(f, p)", "method", "SGD ms/step", "K-FAC ms/step", "ratio (rounds)", "CPU-time ratio"]
    head += [PHASE_STYLE[name][0] for name in PHASES] + ["profiled ms/step", "named / step", "rounds (redone)"]
    head.append("min busy")
    body = []
    for entry in results["results"]:
        freq = f"({entry['freq'][0]}, {entry['freq'][1]})"
        sgd = entry["sgd"]["median_ms"]
        row = [entry["model"], freq, "SGD", _ms(sgd), "", "", ""] + _phases(entry["sgd_phases_ms"])
        row += [_ms(entry["sgd_beside_profiled_ms"]), "", f"{entry['rounds']} ({entry['discarded_rounds']})"]
        body.append([*row, f"{entry['min_busy']:.2f}"])
        for method, m in entry["methods"].items():
            prof = m["profiled"]
            spread = f"{min(m['ratio_per_round']):.2f}-{max(m['ratio_per_round']):.2f}"
            check = f"{prof['coverage']:.2f}" + ("" if prof["within_tolerance"] else " (!)")
            row = ["", "", method, _ms(sgd), _ms(m["median_ms"]), f"**{m['ratio']:.2f}x** ({spread})"]
            row.append(f"{m['cpu_ratio']:.2f}x")
            body.append(row + _phases(prof["phases_ms"]) + [_ms(prof["step_ms"]), check, "", ""])
    return md_table(head, body)


def flop_table(rows: list[dict[str, Any]]) -> list[str]:
    """Extra FLOPs of each K-FAC part over forward + backward, per kind of step, and the K-FAC / SGD FLOP ratios."""
    freqs = list(rows[0]["ratios"]) if rows else []
    head = ["configuration", "fwd+bwd GFLOP", "factors / factor step", "eigh / inverse step", "Cholesky / inverse step"]
    head += ["precond eigen / step", "precond inverse / step"]
    head += [f"ratio ({f}) {m}" for f in freqs for m in ("eigen", "inverse")]
    body = []
    for r in rows:
        cells = [r["config"], f"{r['forward_backward_gflop']:.3g}", f"{r['per_factor_step']['factors']:.2f}"]
        cells += [f"{r['per_inverse_step'][k]:.2f}" for k in ("eigh", "cholesky")]
        cells += [f"{r['per_step'][k]:.3f}" for k in ("eigen", "inverse")]
        body.append(cells + [f"{r['ratios'][f][m]:.2f}" for f in freqs for m in ("eigen", "inverse")])
    return md_table(head, body)


def headline(results: dict[str, Any]) -> list[str]:
    """The issue's target line for the proxy at (10, 100), if it was measured."""
    lines = []
    for entry in results["results"]:
        if entry["model"].startswith(TARGET_MODEL) and entry["freq"] == TARGET_FREQ:
            for method, m in entry["methods"].items():
                verdict = "meets" if m["ratio"] <= TARGET else "misses"
                lines.append(
                    f"- {TARGET_MODEL} at (10, 100), {method}: K-FAC {m['median_ms']:.1f} ms vs SGD "
                    f"{entry['sgd']['median_ms']:.1f} ms per step = **{m['ratio']:.2f}x** ({verdict} the "
                    f"{TARGET:.2f}x target)"
                )
    return lines


def operators_section(counts: list[dict[str, Any]]) -> list[str]:
    """The ATen operators per kind of step and method of each model measured (``results["operators"]``)."""
    lines = [
        "## ATen operators per kind of step",
        "",
        "Counted on the CPU (kfac_dist/app/bench/operators.py, docs/BENCHMARKS.md section 6): operators beyond SGD's "
        "forward + backward, `hooks` (added to forward + backward by the capture hooks), `step` (`pre.step()`), "
        "`extra` = both. On a GPU each is a kernel launch plus Python.",
    ]
    for entry in counts:
        model = entry["counted"]
        lines += [
            "",
            f"{entry['model']}: counted on {model['builder']} {model['kwargs']}, input {model['input_shape']}, "
            f"batch {entry['batch']}; SGD's forward + backward: {entry['sgd_forward_backward']} operators.",
            "",
            *kinds_table(entry),
        ]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report (docs/results/overhead.md; a device run's: :mod:`overhead_device_report`)."""
    if results.get("protocol") == "device":
        from kfac_dist.app.bench import overhead_device_report  # it uses this module's tables

        return overhead_device_report.markdown(results)
    meta = results.get("meta", {})
    lines = ["# Overhead: time per step of SGD-momentum + K-FAC vs SGD-momentum", ""]
    if meta:
        loads = load_text(meta["load_average_before_after"])
        lines += [
            f"- date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread",
            f"- command: `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min; load average before / after: "
            f"{loads})",
        ]
    lines += headline(results)
    lines += [
        "",
        "Step times are medians over rounds of whole-inverse-period blocks, arms interleaved in one process; the "
        "ratio is the ratio of medians, with the range of the per-round ratios in brackets; the CPU-time ratio is "
        "the same with process CPU time (1 thread: it leaves out time the process waited for a core). Phases "
        "(ms per step) come from a separate profiled block per K-FAC arm (SGD: the medians of its timed blocks); "
        "`other` is zero_grad + optimizer.step + what no phase covers; `profiled ms/step` is the profiled "
        "block's measured step (SGD: an SGD block run beside the profiled ones); `named / step` is the sum of "
        "the named phases over that measured step (the check: within 1 +- "
        f"{results['tolerance']:.2f}). Rounds with a block busy < {results['min_busy']:g} of its wall time were "
        f"rerun (at most {results['max_retries']} times); `redone` counts them and `min busy` is the lowest "
        "CPU / wall of the kept blocks.",
        "",
        *results_table(results),
        "",
        "## FLOP model",
        "",
        "Extra FLOPs per step of each K-FAC part over forward + backward FLOPs of the preconditioned layers "
        f"(eigh counted as {EIGH_FLOPS_PER_N3:g} n^3, Cholesky inverse as n^3; kfac_dist/app/bench/overhead_flops.py).",
        "",
        *flop_table(results.get("flops", [])),
        "",
    ]
    health = [
        f"- {entry['model']} {tuple(entry['freq'])} {method}: "
        + ", ".join(f"{k} {v}" for k, v in m["health"].items() if v)
        for entry in results["results"]
        for method, m in entry["methods"].items()
        if any(m["health"].values())
    ]
    if health:
        lines += ["## Numerical fallbacks (pre.health(), whole run incl. warm-up)", "", *health, ""]
    if "operators" in results:
        lines += operators_section(results["operators"])
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> Path:
    """Stacked bars of the phase breakdown (ms per step), one panel per model; writes ``<out>.png``.

    Each frequency has an SGD bar and one bar per K-FAC method; a black tick marks the unprofiled median step
    time of the arm, a dashed red tick 1.15x SGD's. A device run's plot: :mod:`overhead_device_report`.
    """
    if results.get("protocol") == "device":
        from kfac_dist.app.bench import overhead_device_report

        return overhead_device_report.plot(results, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(entry["model"] for entry in results["results"]))
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        labels: list[str] = []
        ticks: list[float] = []
        x = 0.0
        for entry in (e for e in results["results"] if e["model"] == model):
            sgd = entry["sgd"]["median_ms"]
            bars = [("SGD", entry["sgd_phases_ms"], sgd)]
            bars += [(m, v["profiled"]["phases_ms"], v["median_ms"]) for m, v in entry["methods"].items()]
            start = x
            for name, phases, median in bars:
                bottom = 0.0
                for phase in PHASES:
                    value = max(phases[phase], 0.0)
                    ax.bar(x, value, bottom=bottom, color=PHASE_STYLE[phase][1], width=0.8)
                    bottom += value
                ax.plot([x - 0.4, x + 0.4], [median, median], color="black", linewidth=1.5)
                labels.append(f"{name}\n({entry['freq'][0]},{entry['freq'][1]})")
                ticks.append(x)
                x += 1.0
            ax.plot([start - 0.4, x - 0.6], [TARGET * sgd] * 2, color="red", linestyle="--", linewidth=1)
            x += 0.6
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_title(model, fontsize=10)
    handles: list[Any] = [plt.Rectangle((0, 0), 1, 1, color=PHASE_STYLE[p][1]) for p in PHASES]
    handles += [plt.Line2D([], [], color="black"), plt.Line2D([], [], color="red", linestyle="--")]
    names = [PHASE_STYLE[p][0] for p in PHASES] + ["unprofiled median", f"{TARGET:g}x SGD"]
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
