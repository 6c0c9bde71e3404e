"""Markdown tables and the PNG of a ``kfac-dist bench comm`` run, and the fractions and schemes it compares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfac_dist.app.bench.common import md_table
from kfac_dist.app.units import MIB

__all__ = ["FRACTIONS", "FRACTION_TITLES", "SCHEMES", "SCHEME_TITLES", "markdown", "plot"]

#: Grad-worker fractions, by the library's names (mem-opt is 1/W).
FRACTIONS = ("mem-opt", "hybrid-opt", "comm-opt")
FRACTION_TITLES = {"mem-opt": "1/W", "hybrid-opt": "0.5", "comm-opt": "1"}
#: Factor-exchange schemes compared, as preconditioner options.
SCHEMES: dict[str, dict[str, Any]] = {
    "ours": {"factor_comm": "owner", "symmetric_comm": True},
    "kaisa": {"factor_comm": "allreduce", "symmetric_comm": False},
    "kaisa_packed": {"factor_comm": "allreduce", "symmetric_comm": True},
}
SCHEME_TITLES = {
    "ours": "ours (reduce to owner, triangles)",
    "kaisa": "KAISA (allreduce, full squares)",
    "kaisa_packed": "KAISA + triangles",
}

COLORS = {"mem-opt": "#c44e52", "hybrid-opt": "#4c72b0", "comm-opt": "#55a868"}
STYLES = {"ours": "-", "kaisa": "--", "kaisa_packed": ":"}
KINDS = ("factor", "inverse", "plain")


def _mib(value: float) -> str:
    return f"{value / MIB:,.1f}" if value >= 10 * MIB else f"{value / MIB:,.2f}"


def _wf(row: dict[str, Any]) -> list[str]:
    return [str(row["world_size"]), FRACTION_TITLES[row["fraction"]]]


def bytes_table(rows: list[dict[str, Any]]) -> list[str]:
    """Amortised traffic per rank per step (MiB), mean and max over ranks, per scheme."""
    head = ["W", "f", "g", "ours mean", "ours max", "KAISA mean", "KAISA max", "KAISA+tri max", "ours / KAISA (max)"]
    body = []
    for row in rows:
        s = {k: v["bytes"]["amortised"] for k, v in row["schemes"].items()}
        ratio = s["ours"]["max"] / s["kaisa"]["max"] if s["kaisa"]["max"] else float("nan")
        cells = [_mib(s[k][m]) for k in ("ours", "kaisa") for m in ("mean", "max")] + [_mib(s["kaisa_packed"]["max"])]
        body.append([*_wf(row), str(row["grad_workers"]), *cells, f"{ratio:.2f}"])
    return md_table(head, body)


def kinds_table(rows: list[dict[str, Any]]) -> list[str]:
    """Traffic per rank (max over ranks, MiB) in each kind of step, ours and KAISA's, with the main category."""
    head = ["W", "f"] + [f"{s} {k} step" for s in ("ours", "KAISA") for k in KINDS]
    per_kind = [(row, [row["schemes"][s]["bytes"] for s in ("ours", "kaisa")]) for row in rows]
    return md_table(
        head, (_wf(r) + [_mib(b[k]["max"]) if k in b else "-" for b in bs for k in KINDS] for r, bs in per_kind)
    )


def category_table(rows: list[dict[str, Any]]) -> list[str]:
    """Amortised traffic by category (max over ranks, MiB), ours and KAISA's."""
    cats = {"factor_reduce": "factors", "decomposition_broadcast": "decomp.", "gradient_broadcast": "gradients"}
    head = ["W", "f"] + [f"{s} {short}" for s in ("ours", "KAISA") for short in cats.values()]
    by = [(row, [row["schemes"][s]["bytes"]["amortised"]["by_category"] for s in ("ours", "kaisa")]) for row in rows]
    return md_table(head, (_wf(r) + [_mib(b[c]["max"]) for b in bs for c in cats] for r, bs in by))


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    """K-FAC memory per rank (MiB): ours by category (max over ranks), totals beside KAISA's."""
    head = ["W", "f", "ours factors", "ours decompositions", "ours buffers", "ours total max", "ours total mean"]
    head += ["KAISA total max", "KAISA+tri total max", "ours / KAISA (max)"]
    body = []
    for row in rows:
        ours, kaisa, packed = (row["schemes"][s]["memory"] for s in SCHEMES)
        cells = _wf(row) + [_mib(ours["by_category_max"][c]) for c in ("factors", "decompositions", "buffers")]
        cells += [_mib(ours["max"]), _mib(ours["mean"]), _mib(kaisa["max"]), _mib(packed["max"])]
        body.append([*cells, f"{ours['max'] / kaisa['max']:.2f}"])
    return md_table(head, body)


def check_table(cases: list[dict[str, Any]]) -> list[str]:
    """The real gloo runs beside the planner: one row per W, fraction and scheme."""
    head = ["W", "f", "g", "scheme", "steps (kinds)", "bytes recorded, per rank (MiB)", "memory per rank (MiB)"]
    body = []
    for case in cases:
        equal = "yes" if case["equal"] else f"**no** ({len(case['mismatches'])}+ mismatches)"
        if "amortised_equal" in case:
            equal += ", amortised: " + ("yes" if case["amortised_equal"] else "**no**")
        cells = [*_wf(case), str(case["grad_workers"]), SCHEME_TITLES[case["scheme"]]]
        cells += [f"{case['steps']} ({', '.join(case['kinds'])})", " / ".join(_mib(t) for t in case["traffic"])]
        body.append([*cells, " / ".join(_mib(m) for m in case["memory"]), f"{case['compared']:,}", equal])
    return md_table([*head, "integers compared", "equal to the planner"], body)


def markdown(results: dict[str, Any]) -> str:
    """The whole Markdown report."""
    meta, check = results["meta"], results["check"]
    f, p = results["freq"]
    equal = sum(c["equal"] for c in check["cases"])
    lines = [
        "# Communication and memory per rank (`kfac-dist bench comm`)",
        "",
        f"- Date: {meta['date']}. Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread per "
        f"process. Wall time: {meta['wall_seconds'] / 60:.1f} min.",
        f"- Command: `{meta['command']}`",
        f"- Planned: {results['planned_model']} (224x224, 1000 classes), float32 factors, decompositions and "
        f"gradients, eigen method, 25 MiB fusion buckets, factors every {f} steps and decompositions every {p} "
        "(so per period: 9 factor steps, 1 inverse step, 90 plain steps). Traffic = bytes sent + received by a "
        "rank, in the bandwidth-optimal accounting of docs/distributed.md. Every scheme uses the same placement.",
        "- Schemes: " + "; ".join(f"**{SCHEME_TITLES[s]}** (`{_options(s)}`)" for s in SCHEMES) + ".",
        "",
        f"## Traffic per rank per step, amortised over ({f}, {p}) (MiB)",
        "",
        *bytes_table(results["planner"]),
        "",
        "## Traffic per rank in each kind of step (max over ranks, MiB)",
        "",
        *kinds_table(results["planner"]),
        "",
        "## Amortised traffic by category (max over ranks, MiB per step)",
        "",
        *category_table(results["planner"]),
        "",
        "## K-FAC memory per rank (MiB)",
        "",
        "Per category: the largest value over ranks; totals: the busiest rank and the mean over ranks.",
        "",
        *memory_table(results["planner"]),
        "",
        "## Planner vs real gloo runs",
        "",
        f"Model: `{check['proxy']['builder']}` with `{check['proxy']['kwargs']}` on {check['proxy']['input_shape']} "
        f"inputs (ResNet-50's 54 preconditioned layers at 1/8 width), batch {check['batch']} per rank, "
        f"{check['steps']} steps at ({f}, {p}), real gloo processes on loopback (1 thread each). Every step's "
        "`comm_stats()` difference on every rank is compared with the planner's bytes for that kind of step, and "
        "the final `memory_usage()` with the planner's memory, as integers. "
        f"**{equal} of {len(check['cases'])} cases equal the planner exactly.**",
        "",
        *check_table(check["cases"]),
        "",
    ]
    return "\n".join(lines)


def _options(scheme: str) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in SCHEMES[scheme].items())


def plot(results: dict[str, Any], out: Path) -> Path:
    """Amortised traffic and memory of the busiest rank vs W; colour per f, line style per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = results["planner"]
    for fraction in FRACTIONS:
        mine = [r for r in rows if r["fraction"] == fraction]
        sizes = [r["world_size"] for r in mine]
        for scheme in SCHEMES:
            label = f"{SCHEME_TITLES[scheme]}, f={FRACTION_TITLES[fraction]}"
            traffic = [r["schemes"][scheme]["bytes"]["amortised"]["max"] / MIB for r in mine]
            memory = [r["schemes"][scheme]["memory"]["max"] / MIB for r in mine]
            style = {"color": COLORS[fraction], "linestyle": STYLES[scheme], "marker": "o", "markersize": 3}
            axes[0].plot(sizes, traffic, label=label, **style)
            axes[1].plot(sizes, memory, **style)
    titles = ("traffic per step, busiest rank (MiB sent + received)", "K-FAC memory, busiest rank (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("world size W")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    f, p = results["freq"]
    fig.suptitle(f"{results['planned_model']}, amortised over factors every {f} / decompositions every {p} steps")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
