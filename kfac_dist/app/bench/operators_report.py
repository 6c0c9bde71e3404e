"""Markdown table and PNG of a ``kfac-dist bench operators`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfac_dist.app.bench.common import load_text, md_table

__all__ = ["kinds_table", "markdown", "plot"]

KINDS = ("plain", "factor", "inverse")


def kinds_table(counts: dict[str, Any]) -> list[str]:
    """Operators per kind of step and method beyond SGD's forward + backward (counts of ``count_kinds``)."""
    sgd = counts["sgd_forward_backward"]
    most = counts.get("max_extra_over_ranks")
    rows = []
    for method, kinds in counts["methods"].items():
        for kind in KINDS:
            c = kinds[kind]
            row = [method, kind, str(c["hooks"]), str(c["step"]), str(c["extra"]), f"{c['extra'] / sgd:.2f}"]
            rows.append(row + ([str(most[method][kind])] if most else []))
    header = ["method", "step", "hooks", "step", "extra", "extra / SGD"]
    return md_table(header + (["extra, max over ranks"] if most else []), rows)


def markdown(results: dict[str, Any]) -> str:
    """The counts per kind of step and method, beside SGD's forward + backward, and the commonest operators."""
    meta, sgd = results["meta"], results["sgd_forward_backward"]
    settings = meta["settings"]
    model = settings["model"]
    lines = [
        "# ATen operators per K-FAC step",
        "",
        f"Date: {meta['date']}; torch {meta['torch']}; command: `{meta['command']}`; "
        f"load {load_text(meta['load_average_before_after'])}.",
        f"Model: {model['builder']} {model['kwargs']}, input {model['input_shape']}, batch {settings['batch']}. "
        f"SGD's forward + backward: {sgd} operators.",
        f"Ranks: {settings.get('world_size', 1)} (grad_worker_fraction {settings.get('grad_worker_fraction')}; "
        "counts of rank 0, and with more than one rank the largest extra over the ranks).",
        "",
        "K-FAC's operators beyond SGD's forward + backward: `hooks` (added to forward + backward by the capture "
        "hooks), `step` (`pre.step()`), `extra` = both.",
        "",
    ]
    lines += kinds_table(results)
    for method, kinds in results["methods"].items():
        top = ", ".join(f"{name} {n}" for name, n in kinds["plain"]["top_step_operators"].items())
        lines += ["", f"Commonest operators of `pre.step()` on a plain step, {method}: {top}."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> Path:
    """Bars of K-FAC's extra operators per kind of step and method, with SGD's forward + backward as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(results["methods"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [results["methods"][method][kind]["extra"] for kind in KINDS]
        ax.bar([k + i * width for k in range(len(KINDS))], values, width, label=f"K-FAC {method}")
    ax.axhline(results["sgd_forward_backward"], color="black", linestyle="--", label="SGD forward + backward")
    ax.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(KINDS))], [f"{k} step" for k in KINDS])
    ax.set_ylabel("ATen operators dispatched")
    ax.set_title("K-FAC's operators beyond SGD per step (ResNet-50 proxy)")
    ax.legend()
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
