"""Markdown table and PNG curves of a convergence benchmark's results (the dict of :func:`run_benchmark`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kfac_dist.app.bench.common import load_text, md_table
from kfac_dist.app.bench.convergence_runs import METHOD_TITLES, METHODS

__all__ = ["markdown", "median_curves", "plot"]

#: The issue's target for the MNIST CNN: K-FAC needs <= 0.6x SGD-momentum's steps and <= 0.8x its wall time.
HEADLINE_TASK, HEADLINE_STEPS, HEADLINE_SECONDS = "mnist5k_cnn", 0.6, 0.8
TARGETS = {"loss": "training loss", "acc": "test accuracy"}


def _hyper(hyper: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hyper.items())


def _grid(points: list[dict[str, float]]) -> str:
    """A grid as value sets: ``lr {0.03, 0.1} x damping {0.3, 1}``."""
    names = list(points[0]) if points else []
    return " x ".join(f"{n} {{{', '.join(f'{v:g}' for v in sorted({p[n] for p in points}))}}}" for n in names)


def _num(value: float | None, fmt: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _task_section(name: str, summary: dict[str, Any], seeds: int) -> list[str]:
    task, sizes = summary["task"], summary["sizes"]
    lines = [
        f"## {task['title']} (`{name}`)",
        "",
        f"{sizes['train']:,} training / {sizes['test']:,} test examples, batch {task['batch_size']}, "
        f"{task['max_steps']} steps, checkpoints every {task['eval_every']} steps. Targets: training loss (whole "
        f"training split) <= {task['loss_target']:g}; test accuracy >= {task['acc_target']:g}. Medians over "
        f"{seeds} seeds; seconds are training time only (evaluation excluded).",
        "",
    ]
    head = ["method", "tuned hyperparameters", "loss target: reached", "steps", "seconds"]
    head += ["accuracy target: reached", "steps", "seconds", "ms/step", "final loss", "final accuracy"]
    body = []
    for method in METHODS:
        m = summary["methods"][method]
        edge = f" (grid edge: {', '.join(m['grid_edges'])})" if m.get("grid_edges") else ""
        cells = [METHOD_TITLES[method], _hyper(m["hyper"]) + edge]
        for key in TARGETS:
            t = m[key]
            cells += [f"{t['reached']}/{m['runs']}", _num(t["median_steps"], ".0f"), _num(t["median_seconds"], ".3g")]
        cells += [_num(m["ms_per_step"], ".2f"), _num(m["final_train_loss"], ".4f"), _num(m["final_test_acc"], ".3f")]
        body.append(cells)
    ratios = [
        [f"K-FAC / {METHOD_TITLES[base]}"]
        + [_ratio(summary["ratios"][f"kfac/{base}"][key][unit]) for key in TARGETS for unit in ("steps", "seconds")]
        for base in ("sgd", "adam")
    ]
    head_ratios = ["ratio of medians", "loss target: steps", "seconds", "accuracy target: steps", "seconds"]
    lines += [*md_table(head, body), "", *md_table(head_ratios, ratios)]
    if name == HEADLINE_TASK:
        lines += ["", *_headline(summary)]
    lines += ["", "Tuning (median steps to both targets over the tuning seeds; - : not reached):", ""]
    for method in METHODS:
        points = [
            f"{_hyper(p['hyper'])}: {_num(p['median_steps_to_both'], '.0f', '-')}" for p in summary["grid"][method]
        ]
        lines.append(f"- {METHOD_TITLES[method]}: " + "; ".join(points))
    return lines + [""]


def _headline(summary: dict[str, Any]) -> list[str]:
    """The issue's target, checked per target metric: met / not met."""
    lines = [f"Issue target (K-FAC <= {HEADLINE_STEPS}x SGD-momentum's steps and <= {HEADLINE_SECONDS}x its time):"]
    for key, title in TARGETS.items():
        r = summary["ratios"]["kfac/sgd"][key]
        checks = []
        for unit, bound in (("steps", HEADLINE_STEPS), ("seconds", HEADLINE_SECONDS)):
            value = r[unit]
            verdict = "n/a" if value is None else ("met" if value <= bound else "NOT met")
            checks.append(f"{unit} {_ratio(value)} (<= {bound}x: {verdict})")
        lines.append(f"- {title} target: " + ", ".join(checks))
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: a header with date, machine and command, then one section per task."""
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    kfac = settings.get("kfac", {})
    grids = settings.get("grids", {})
    lines = [
        "# Convergence benchmark: SGD-momentum + K-FAC vs SGD-momentum vs Adam",
        "",
        f"- Date: {meta.get('date', '?')}; machine: {meta.get('machine', '?')}; {meta.get('threads', 1)} thread per "
        f"process; torch {meta.get('torch', '?')}; benchmark wall time {meta.get('wall_seconds', 0) / 60:.1f} min; "
        f"load average (1/5/15 min) before / after: {load_text(meta.get('load_average_before_after', [])) or '?'}.",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Tuning seeds {settings.get('tuning_seeds')}, measured seeds {settings.get('seeds')} (methods interleaved "
        "per seed, order rotating). K-FAC: eigen, factors every "
        f"{kfac.get('factor_update_steps')} steps, decompositions every {kfac.get('inv_update_steps')} steps, "
        f"kl_clip {kfac.get('kl_clip')}, factor_decay 0.95; SGD momentum 0.9; Adam betas (0.9, 0.999).",
        "- Grids: " + "; ".join(f"{METHOD_TITLES[m]}: {_grid(grids.get(m, []))}" for m in METHODS) + ".",
        "",
    ]
    seeds = len(settings.get("seeds", []))
    for name, summary in results["tasks"].items():
        lines += _task_section(name, summary, seeds)
    return "\n".join(lines)


def median_curves(runs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-checkpoint statistics over the runs of one method (padded past a divergence: loss inf, accuracy 0).

    Returns:
        ``steps``, ``seconds`` (median), ``loss`` / ``acc`` (median) and ``loss_lo`` / ``loss_hi`` / ``acc_lo`` /
        ``acc_hi`` (min and max over runs).
    """
    longest = max(runs, key=lambda r: len(r["steps"]))
    n = len(longest["steps"])

    def stack(key: str, pad: float) -> np.ndarray:
        rows = [[pad if v is None else v for v in r[key]] + [pad] * (n - len(r[key])) for r in runs]
        return np.asarray(rows, dtype=float)

    loss, acc, seconds = stack("train_loss", np.inf), stack("test_acc", 0.0), stack("seconds", np.nan)
    finite_loss = np.where(np.isfinite(loss), loss, np.nan)
    return {
        "steps": np.asarray(longest["steps"], dtype=float),
        "seconds": np.nanmedian(seconds, axis=0),
        "loss": np.median(loss, axis=0),
        "loss_lo": np.nanmin(finite_loss, axis=0),
        "loss_hi": np.nanmax(finite_loss, axis=0),
        "acc": np.median(acc, axis=0),
        "acc_lo": acc.min(axis=0),
        "acc_hi": acc.max(axis=0),
    }


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per task: training loss and test accuracy against steps and against training seconds.

    Lines are medians over the measured seeds, bands the min-max over seeds, dashed lines the targets.

    Returns:
        The written paths, ``<out>_<task>.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, summary in results["tasks"].items():
        task = summary["task"]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
        for method, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            runs = [
                r for r in results["runs"] if r["task"] == name and r["phase"] == "measure" and r["method"] == method
            ]
            if not runs:
                continue
            c = median_curves(runs)
            label = f"{METHOD_TITLES[method]} ({_hyper(summary['methods'][method]['hyper'])})"
            for row, key in enumerate(("loss", "acc")):
                axes[row, 0].plot(c["steps"], c[key], color=color, label=label)
                with np.errstate(invalid="ignore"):
                    axes[row, 0].fill_between(c["steps"], c[f"{key}_lo"], c[f"{key}_hi"], color=color, alpha=0.15)
                axes[row, 1].plot(c["seconds"], c[key], color=color, label=label)
        for col, xlabel in enumerate(("steps", "training seconds (median over seeds)")):
            axes[0, col].axhline(task["loss_target"], color="grey", linestyle="--", linewidth=1)
            axes[1, col].axhline(task["acc_target"], color="grey", linestyle="--", linewidth=1)
            axes[0, col].set_yscale("log")
            axes[0, col].set_ylabel("training loss (whole training split)")
            axes[1, col].set_ylabel("test accuracy")
            axes[1, col].set_ylim(max(0.0, task["acc_target"] - 0.15), 1.0)
            axes[1, col].set_xlabel(xlabel)
            for row in range(2):
                axes[row, col].grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        seeds = len({r["seed"] for r in results["runs"] if r["task"] == name and r["phase"] == "measure"})
        fig.suptitle(f"{task['title']}: median over {seeds} seeds (bands: min-max)")
        fig.tight_layout()
        path = Path(f"{out}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
