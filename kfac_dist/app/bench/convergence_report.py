"""Markdown tables and PNG figures of a convergence benchmark's results (the dict of :func:`run_benchmark`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kfac_dist.app.bench.common import load_text, md_table
from kfac_dist.app.bench.convergence_methods import FIRST_ORDER, KFAC_METHODS, METHODS

__all__ = ["issue_bounds", "markdown", "median_curves", "plot"]

TARGETS = {"loss": "training loss", "acc": "test accuracy"}
#: The issue's targets: from this batch size on, K-FAC <= these ratios of the best first-order method's steps / time.
LARGE_BATCH, LARGE_STEPS, LARGE_SECONDS = 1000, 0.5, 0.8
#: Below it, K-FAC never needs more steps than the best first-order method.
SMALL_STEPS = 1.0
COLORS = {
    "sgd": "tab:blue", "adam": "tab:orange", "kfac": "tab:green", "kfac_mc": "tab:red",
    "kfac_adaptive": "tab:purple", "kfac_noclip": "tab:brown",
}  # fmt: skip


def issue_bounds(batch_size: int) -> dict[str, float]:
    """The issue's bounds on K-FAC / best first-order at a batch size: ``{"steps": ..., ["seconds": ...]}``."""
    if batch_size >= LARGE_BATCH:
        return {"steps": LARGE_STEPS, "seconds": LARGE_SECONDS}
    return {"steps": SMALL_STEPS}


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


def _title(method: str) -> str:
    return METHODS[method].title


def _targets(summary: dict[str, Any]) -> list[str]:
    return [key for key in TARGETS if key in next(iter(summary["methods"].values()))]


def _verdict(ratios: dict[str, float | None], bounds: dict[str, float]) -> str:
    """``met`` / ``NOT met`` of the issue's bounds for one K-FAC method, target and case."""
    values = [ratios[unit] for unit in bounds]
    if any(v is None for v in values):
        return "NOT met (not reached)"
    return "met" if all(v is not None and v <= bounds[u] for u, v in zip(bounds, values, strict=True)) else "NOT met"


def _issue_table(results: dict[str, Any]) -> list[str]:
    """Every case and target: the best first-order method and each K-FAC method's step / time ratios to it."""
    kfac = [m for m in KFAC_METHODS if any(m in s["methods"] for s in results["tasks"].values())]
    head = ["case", "target", "best first-order: steps", "s", *[f"{_title(m)}: steps / time" for m in kfac], "bound"]
    body = []
    for key, summary in results["tasks"].items():
        bounds = issue_bounds(summary["task"]["batch_size"])
        for target in _targets(summary):
            best = summary["best_first_order"][target]
            cells = [f"`{key}`", TARGETS[target]]
            for unit in ("steps", "seconds"):
                name = best[unit]
                value = summary["methods"][name][target][f"median_{unit}"] if name else None
                cells.append("not reached" if name is None else f"{_num(value, '.3g')} ({name})")
            for method in kfac:
                r = summary["ratios"].get(method, {}).get("best", {}).get(target)
                text = "-" if r is None else f"{_ratio(r['steps'])} / {_ratio(r['seconds'])}: {_verdict(r, bounds)}"
                cells.append(text)
            cells.append(" and ".join(f"{unit} <= {b}x" for unit, b in bounds.items()))
            body.append(cells)
    return md_table(head, body)


def _variant_table(results: dict[str, Any]) -> list[str]:
    """Each K-FAC variant against the protocol's K-FAC: median steps (seconds) until every target, per case."""
    variants = [m for m in KFAC_METHODS[1:] if any(m in s["methods"] for s in results["tasks"].values())]
    head = ["case", f"{_title(KFAC_METHODS[0])}: steps (s)", *[f"{_title(m)}: steps (s)" for m in variants]]
    body, fewer, more = [], dict.fromkeys(variants, 0), dict.fromkeys(variants, 0)
    for key, summary in results["tasks"].items():
        methods = summary["methods"]
        base = methods.get(KFAC_METHODS[0], {}).get("all", {}).get("median_steps")
        cells = [f"`{key}`"]
        for method in (KFAC_METHODS[0], *variants):
            entry = methods.get(method, {}).get("all")
            if entry is None:
                cells.append("-")
                continue
            steps, seconds = entry["median_steps"], entry["median_seconds"]
            cells.append(f"{_num(steps, '.0f')} ({_num(seconds, '.3g', '-')})")
            if method != KFAC_METHODS[0]:
                mine, theirs = (math.inf if v is None else v for v in (steps, base))
                fewer[method] += mine < theirs
                more[method] += mine > theirs
        body.append(cells)
    counts = [f"{fewer[m]} / {more[m]}" for m in variants]
    body.append(["cases with fewer / more steps than the protocol's", "", *counts])
    return md_table(head, body)


def _kl_table(results: dict[str, Any]) -> list[str]:
    """Where KL-clip binds: per case and K-FAC method with a clip, the fraction of steps it scaled down."""
    head = ["case", "method", "tuned", "steps clipped", "median KL-clip scale", "final damping"]
    body = []
    for key, summary in results["tasks"].items():
        for method in KFAC_METHODS:
            m = summary["methods"].get(method)
            if m is None:
                continue
            body.append([
                f"`{key}`", _title(method), _hyper(m["hyper"]), f"{100 * m['kl_clipped_fraction']:.0f}%",
                _num(m["kl_scale_median"], ".3g", "no clip"), _num(m["final_damping"], ".3g", "-"),
            ])  # fmt: skip
    return md_table(head, body)


def _case_section(name: str, summary: dict[str, Any], seeds: int) -> list[str]:
    task, sizes = summary["task"], summary["sizes"]
    targets = _targets(summary)
    target_text = f"training loss (whole training split) <= {task['loss_target']:g}"
    if "acc" in targets:
        target_text += f"; test accuracy >= {task['acc_target']:g}"
    lines = [
        f"## {task['title']}, batch {task['batch_size']} (`{name}`)",
        "",
        f"{sizes['train']:,} training / {sizes['test']:,} test examples, batch {task['batch_size']}, budget "
        f"{task['max_steps']} steps, checkpoints every {task['eval_every']} steps, K-FAC decompositions every "
        f"{task['inv_update_steps']} steps. Targets: {target_text}. Medians over {seeds} seeds; seconds are "
        "training time only (evaluation excluded).",
        "",
    ]
    head = ["method", "tuned hyperparameters"]
    for key in targets:
        head += [f"{key} target: reached", "steps", "seconds"]
    head.append("ms/step")
    body = []
    for method, m in summary["methods"].items():
        edge = f" (grid edge: {', '.join(m['grid_edges'])})" if m.get("grid_edges") else ""
        cells = [_title(method), _hyper(m["hyper"]) + edge]
        for key in targets:
            t = m[key]
            cells += [f"{t['reached']}/{m['runs']}", _num(t["median_steps"], ".0f"), _num(t["median_seconds"], ".3g")]
        body.append([*cells, _num(m["ms_per_step"], ".2f")])
    head_ratios = ["ratio of medians", *[f"{key} target: {unit}" for key in targets for unit in ("steps", "seconds")]]
    ratios = []
    for method, per_base in summary["ratios"].items():
        for base, per_key in per_base.items():
            base_title = "best first-order" if base == "best" else _title(base)
            cells = [f"{_title(method)} / {base_title}"]
            ratios.append(cells + [_ratio(per_key[key][unit]) for key in targets for unit in ("steps", "seconds")])
    lines += [*md_table(head, body), "", *md_table(head_ratios, ratios)]
    lines += ["", "Tuning (median steps to every target over the tuning seeds; - : not reached or stopped):", ""]
    for method, points in summary["grid"].items():
        scored = [f"{_hyper(p['hyper'])}: {_num(p['median_steps_to_all'], '.0f', '-')}" for p in points]
        lines.append(f"- {_title(method)}, grid {_grid([p['hyper'] for p in points])}: " + "; ".join(scored))
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: header, the issue's targets, where KL-clip binds, then one section per case."""
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    kfac = settings.get("kfac", {})
    lines = ["# Convergence benchmark: K-FAC's variants vs tuned SGD-momentum and Adam", ""]
    for part in results.get("parts", [meta]):
        lines.append(_run_line(part))
    lines += [
        f"- Tuning seeds {settings.get('tuning_seeds')}, measured seeds per case below (methods interleaved "
        "per seed, order rotating; a measured run ends once it has reached every target). K-FAC: SGD momentum 0.9 "
        f"+ {kfac.get('compute_method')}, factors every {kfac.get('factor_update_steps')} steps, decompositions "
        f"every {kfac.get('inv_update_steps') or 'case-dependent'} steps, kl_clip {kfac.get('kl_clip')}, "
        f"fisher {kfac.get('fisher')}, factor_decay 0.95; each variant changes one option. Adam betas (0.9, 0.999).",
        "- Each method's grid: per case below (K-FAC: lr x damping in the task's factor scale).",
        "",
        "## The issue's targets: each K-FAC method against the best tuned first-order method",
        "",
        *_issue_table(results),
        "",
        "## K-FAC's variants against its protocol (median steps and seconds until every target)",
        "",
        *_variant_table(results),
        "",
        "## Where KL-clip binds (measured runs)",
        "",
        *_kl_table(results),
        "",
    ]
    for name, summary in results["tasks"].items():
        seeds = len({r["seed"] for r in results["runs"] if r["task"] == name and r["phase"] == "measure"})
        lines += _case_section(name, summary, seeds)
    return "\n".join(lines)


def _run_line(meta: dict[str, Any]) -> str:
    """One benchmark run's date, machine, load, wall time and command."""
    return (
        f"- Run `{meta.get('command', '?')}`: {meta.get('date', '?')}; {meta.get('machine', '?')}; "
        f"{meta.get('threads', 1)} thread per process; torch {meta.get('torch', '?')}; wall time "
        f"{meta.get('wall_seconds', 0) / 60:.1f} min; load average (1/5/15 min) before / after: "
        f"{load_text(meta.get('load_average_before_after', [])) or '?'}."
    )


def median_curves(runs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-checkpoint statistics over the runs of one method.

    Runs that ended earlier (at their targets, or diverged) are padded with their last value (loss: +inf after a
    divergence; accuracy: 0 after a divergence).

    Returns:
        ``steps``, ``seconds`` (median), ``loss`` / ``acc`` (median) and ``loss_lo`` / ``loss_hi`` / ``acc_lo`` /
        ``acc_hi`` (min and max over runs).
    """
    longest = max(runs, key=lambda r: len(r["steps"]))
    n = len(longest["steps"])

    def stack(key: str, diverged_pad: float) -> np.ndarray:
        rows = []
        for r in runs:
            values = [np.nan if v is None else v for v in r[key]]
            pad = diverged_pad if r["diverged"] else values[-1]
            rows.append(values + [pad] * (n - len(values)))
        return np.asarray(rows, dtype=float)

    loss, acc = stack("train_loss", np.inf), stack("test_acc", 0.0)
    seconds = np.asarray([r["seconds"] + [np.nan] * (n - len(r["seconds"])) for r in runs], dtype=float)
    finite_loss = np.where(np.isfinite(loss), loss, np.nan)
    with np.errstate(invalid="ignore"):
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


def _case_figure(results: dict[str, Any], name: str, summary: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    task = summary["task"]
    targets = _targets(summary)
    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 4 * len(targets)), sharex="col", squeeze=False)
    for method in summary["methods"]:
        runs = [r for r in results["runs"] if r["task"] == name and r["phase"] == "measure" and r["method"] == method]
        if not runs:
            continue
        c = median_curves(runs)
        label = f"{_title(method)} ({_hyper(summary['methods'][method]['hyper'])})"
        for row, key in enumerate(targets):
            axes[row, 0].plot(c["steps"], c[key], color=COLORS[method], label=label)
            with np.errstate(invalid="ignore"):
                axes[row, 0].fill_between(c["steps"], c[f"{key}_lo"], c[f"{key}_hi"], color=COLORS[method], alpha=0.12)
            axes[row, 1].plot(c["seconds"], c[key], color=COLORS[method], label=label)
    for col, xlabel in enumerate(("steps", "training seconds (median over seeds)")):
        for row, key in enumerate(targets):
            axes[row, col].axhline(task[f"{key}_target"], color="grey", linestyle="--", linewidth=1)
            axes[row, col].grid(alpha=0.3)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("training loss (whole training split)")
        if "acc" in targets:
            axes[1, col].set_ylabel("test accuracy")
            axes[1, col].set_ylim(max(0.0, task["acc_target"] - 0.15), 1.0)
        axes[-1, col].set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=7)
    seeds = len({r["seed"] for r in results["runs"] if r["task"] == name and r["phase"] == "measure"})
    title = f"{task['title']}, batch {task['batch_size']}: median over {seeds} seeds (bands: min-max)"
    return _save(fig, title, Path(f"{out}_{name}.png"))


def _save(fig: Any, title: str, path: Path) -> Path:
    """Title, lay out, write and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _sweep_figure(results: dict[str, Any], task_name: str, cases: list[dict[str, Any]], out: Path) -> Path:
    """Steps and seconds to the loss target against the batch size, one line per method (log-log)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [c["task"]["batch_size"] for c in cases]
    for method in METHODS:
        for col, unit in enumerate(("steps", "seconds")):
            values = [c["methods"].get(method, {}).get("loss", {}).get(f"median_{unit}") for c in cases]
            points = [(b, v) for b, v in zip(sizes, values, strict=True) if v is not None]
            if points:
                style = "--" if method in FIRST_ORDER else "-"
                x, y = zip(*points, strict=True)
                axes[col].plot(x, y, style, marker="o", color=COLORS[method], label=_title(method))
    for col, unit in enumerate(("steps", "training seconds")):
        axes[col].set_xscale("log")
        axes[col].set_yscale("log")
        axes[col].set_xlabel("batch size")
        axes[col].set_ylabel(f"median {unit} to the loss target")
        axes[col].grid(alpha=0.3, which="both")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    title = f"{cases[0]['task']['title']}: steps and time to the loss target against the batch size"
    return _save(fig, title, Path(f"{out}_{task_name}_sweep.png"))


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per case (curves against steps and seconds) and one per task with several batch sizes (the sweep).

    Curves are medians over the measured seeds, bands the min-max over seeds, dashed lines the targets.

    Returns:
        The written paths, ``<out>_<case>.png`` and ``<out>_<task>_sweep.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    written = [_case_figure(results, name, summary, out) for name, summary in results["tasks"].items()]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for summary in results["tasks"].values():
        by_task.setdefault(summary["task"]["name"], []).append(summary)
    for task_name, cases in by_task.items():
        if len(cases) > 1:
            cases.sort(key=lambda c: c["task"]["batch_size"])
            written.append(_sweep_figure(results, task_name, cases, out))
    return written
