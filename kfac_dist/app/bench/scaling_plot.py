"""The PNG of a ``kfac-dist bench scaling`` run: predicted throughput vs W with the measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfac_dist.app.bench.scaling import FRACTIONS
from kfac_dist.app.bench.scaling_report import OPTIMIZERS, world_size_of

__all__ = ["plot"]

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
            rows = sorted(
                (r for r in results["predictions"] if (r["network"], r["mode"]) == (network, mode)), key=world_size_of
            )
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
