"""Markdown tables and the PNG of the overhead benchmark's device protocol (``--device cuda``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfac_dist.app.bench.common import md_table
from kfac_dist.app.bench.overhead_report import PHASE_STYLE, operators_section
from kfac_dist.app.bench.overhead_runs import PHASES

__all__ = ["KAISA_TARGET", "TARGETS", "headline", "markdown", "plot"]

#: Issue 13's targets at frequencies (10, 100): batch -> compute method -> K-FAC step / SGD step at most.
TARGET_FREQ = [10, 100]
TARGETS: dict[int, dict[str, float]] = {32: {"eigen": 1.5, "inverse": 1.3}, 128: {"eigen": 1.2, "inverse": 1.2}}
#: ... and KAISA's step over kfac-dist's, at least.
KAISA_TARGET = 1.6
#: How a device's blocks are timed (kfac_dist.app.bench.overhead_clock).
CLOCKS = {"cuda": "two CUDA events, with nothing that waits for the GPU in between"}


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def label(arm: dict[str, Any]) -> str:
    """A kfac-dist arm's compute method, with its precision unless it is the exact one."""
    precision = arm.get("precision", "highest")
    return str(arm["method"]) + ("" if precision == "highest" else f" {precision}")


def _config(entry: dict[str, Any]) -> list[str]:
    return [str(entry["batch"]), entry["dtype"], f"({entry['freq'][0]}, {entry['freq'][1]})"]


def headline(results: dict[str, Any]) -> list[str]:
    """One line per kfac-dist arm with a target: its ratio to SGD and its speed-up over KAISA, met or missed."""
    lines = []
    for entry in results["results"]:
        targets = TARGETS.get(entry["batch"], {}) if entry["freq"] == TARGET_FREQ else {}
        sgd = entry["arms"]["SGD"]["median_ms"]
        for arm in entry["arms"].values():
            target = targets.get(arm["method"]) if arm["kind"] == "kfac-dist" and "failed" not in arm else None
            if target is None:
                continue
            verdict = "meets" if arm["ratio"] <= target else "misses"
            line = (
                f"- batch {entry['batch']}, {entry['dtype']}, (10, 100), {label(arm)}: {arm['median_ms']:.1f} ms vs "
                f"SGD {sgd:.1f} ms per step = **{arm['ratio']:.2f}x** ({verdict} the {target:g}x target)"
            )
            speedup = entry["kaisa_over_kfac_dist"].get(arm["method"])
            if speedup is not None:
                verdict = "meets" if speedup >= KAISA_TARGET else "misses"
                line += f"; KAISA / kfac-dist **{speedup:.2f}x** ({verdict} the {KAISA_TARGET:g}x target)"
            lines.append(line)
    return lines


def steps_table(results: dict[str, Any]) -> list[str]:
    """Every arm: step time, ratio to SGD, and the profiled block's step and regions (ms per step)."""
    head = ["batch", "dtype", "(f, p)", "arm", "ms/step", "x SGD (rounds)", "profiled ms/step"]
    head += ["fwd", "bwd", "pre.step()", "optimizer", "final loss"]
    body = []
    for entry in results["results"]:
        for name, arm in entry["arms"].items():
            if "failed" in arm:
                body.append([*_config(entry), name, f"failed: {arm['failed']}"] + [""] * (len(head) - 5))
                continue
            spread = f"{min(arm['ratio_per_round']):.2f}-{max(arm['ratio_per_round']):.2f}"
            coarse = arm["coarse_ms"]
            row = [*_config(entry), name, _ms(arm["median_ms"]), f"**{arm['ratio']:.2f}x** ({spread})"]
            row.append(_ms(arm["profiled_step_ms"]))
            row += [_ms(coarse[k]) for k in ("forward", "backward", "kfac_step", "optimizer")]
            body.append([*row, f"{arm['final_loss']:.3g}"])
    return md_table(head, body)


def phases_table(results: dict[str, Any]) -> list[str]:
    """kfac-dist's phases in ms per step (its profiled block) and their sum over that block's step."""
    head = ["batch", "dtype", "(f, p)", "method", *(PHASE_STYLE[p][0] for p in PHASES), "profiled ms/step"]
    body = []
    for entry in results["results"]:
        for arm in entry["arms"].values():
            if "profiled" in arm:
                prof = arm["profiled"]
                check = f"{prof['coverage']:.2f}" + ("" if prof["within_tolerance"] else " (!)")
                phases = [_ms(prof["phases_ms"][p]) for p in PHASES]
                body.append([*_config(entry), label(arm), *phases, _ms(prof["step_ms"]), check])
    return md_table([*head, "named / step"], body)


#: World sizes of the projection in :func:`spread_table`.
SPREAD_WORLDS = (8, 64)


def spread_table(results: dict[str, Any]) -> list[str]:
    """Each kfac-dist arm's ratio to SGD with its decomposition phase divided over W ranks (a projection).

    ``ratio - (1 - 1/W) decomposition / SGD``: MEM-OPT and HYBRID placements give each rank about 1/W of the
    decompositions (kfac_dist/placement.py); the decompositions' broadcast and every other collective are not counted.
    """
    head = ["batch", "dtype", "(f, p)", "method", "x SGD, one rank", "decomposition ms/step"]
    head += [f"x SGD, decompositions over {w} ranks" for w in SPREAD_WORLDS]
    body = []
    for entry in results["results"]:
        sgd = entry["arms"]["SGD"]["median_ms"]
        for arm in entry["arms"].values():
            if arm["kind"] != "kfac-dist" or "profiled" not in arm:
                continue
            decomposition = arm["profiled"]["phases_ms"]["decomposition"]
            spread = [f"{arm['ratio'] - (1 - 1 / w) * decomposition / sgd:.2f}x" for w in SPREAD_WORLDS]
            body.append([*_config(entry), label(arm), f"{arm['ratio']:.2f}x", _ms(decomposition), *spread])
    return md_table(head, body)


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report of a device run."""
    meta = results.get("meta", {})
    lines = [f"# Overhead on {results['device_name']}: time per step of SGD-momentum + K-FAC vs SGD-momentum", ""]
    if meta:
        flags = results["backends"]
        lines += [
            f"- date: {meta['date']}; {results['device']}: {results['device_name']}; torch {meta['torch']}, "
            f"CUDA {flags.get('cuda')}; TF32 matmul {flags.get('matmul_allow_tf32')}, cuDNN "
            f"{flags.get('cudnn_allow_tf32')}; cudnn.benchmark {flags.get('cudnn_benchmark')}; host: {meta['machine']}",
            f"- command: `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min)",
        ]
    model = results["model"]
    lines += headline(results)
    lines += [
        "",
        f"Model: {model['builder']} {model['kwargs']}, input {model['input_shape']}. Every arm starts from the same "
        "weights and cycles through the same batches on the device. A timed block is a whole number of inverse "
        f"periods timed by {CLOCKS.get(results['device'], 'the wall clock')}; `ms/step` is the median "
        "over rounds (arms interleaved, order rotated each round), `x SGD` the ratio of medians with the range of "
        "the per-round ratios. The profiled block of "
        "each arm synchronises the device at every region boundary (`fwd`, `bwd`, `pre.step()`, `optimizer`), and "
        "kfac-dist's `profile=True` synchronises it around every K-FAC phase, so its step (`profiled ms/step`) is "
        "longer than the timed one: the phases show where the time goes, not what overlaps. bf16 is "
        "`torch.autocast(dtype=torch.bfloat16)` around forward and loss.",
        "",
        "## Step times",
        "",
        *steps_table(results),
        "",
        "## Phases of kfac-dist (profiled blocks, ms per step)",
        "",
        f"`named / step` is the named phases' sum over the profiled step (within 1 +- {results['tolerance']:.2f}).",
        "",
        *phases_table(results),
        "",
        "## The way to scale: decompositions spread over ranks (projection)",
        "",
        "The one-rank ratio minus `(1 - 1/W)` of the decomposition phase per step over SGD's step: what MEM-OPT or "
        "HYBRID placement leaves of it on each of W ranks (communication not counted; `kfac-dist bench scaling` "
        "measures and models it with the bytes).",
        "",
        *spread_table(results),
        "",
        *operators_section(results.get("operators", [])),
    ]
    health = [
        f"- batch {entry['batch']} {entry['dtype']} {tuple(entry['freq'])} {name}: "
        + ", ".join(f"{k} {v}" for k, v in arm["health"].items() if v)
        for entry in results["results"]
        for name, arm in entry["arms"].items()
        if any(arm.get("health", {}).values())
    ]
    if health:
        lines += ["## Numerical fallbacks (pre.health(), whole run incl. warm-up)", "", *health, ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> Path:
    """Bars of every arm's step time (ms) per batch size x dtype x frequency pair; writes ``<out>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results["results"]
    names = list(dict.fromkeys(name for entry in entries for name in entry["arms"]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(entries)), 4))
    for i, name in enumerate(names):
        values = [entry["arms"].get(name, {}).get("median_ms", 0.0) for entry in entries]
        ax.bar([k + i * width for k in range(len(entries))], values, width, label=name)
    labels = [f"batch {e['batch']} {e['dtype']}\n({e['freq'][0]}, {e['freq'][1]})" for e in entries]
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(entries))], labels, fontsize=8)
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"{results['model']['builder']} on {results['device_name']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
