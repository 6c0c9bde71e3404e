"""Convergence benchmark: steps and wall time to a target, K-FAC's variants against tuned SGD-momentum and Adam.

Every task runs at each batch size of its sweep (a case); in every case each method is tuned on its own grid and
then measured on the same seeds. Protocol: docs/BENCHMARKS.md section 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kfac_dist.app.bench.common import Log, positive_int
from kfac_dist.app.bench.convergence_methods import (
    FIRST_ORDER,
    FULL_GRIDS,
    METHODS,
    QUICK_GRIDS,
    Grids,
    Hyper,
    KFACSettings,
)
from kfac_dist.app.bench.convergence_runs import TASKS, RunRecord, Task, finite_or_none, load_task_data, train_run
from kfac_dist.app.data.mnist import Split

__all__ = ["FULL", "Settings", "add_arguments", "best_first_order", "run", "run_benchmark", "summarize"]

FULL = "5 measured seeds, full grids, every task's whole batch sweep (the docs/ run)"
UNITS = ("steps", "seconds")


@dataclass
class Settings:
    """Everything a benchmark run depends on (stored in the JSON).

    ``tasks``: each at one batch size (:meth:`Task.at`). ``grids``: per task name, each method's grid.
    ``methods``: the names run, first-order ones included.
    Tuning with one seed stops a grid point once it has run as many steps as the best point so far needed (it can
    no longer beat it); with more tuning seeds every point runs until its targets or its budget.
    """

    tasks: list[Task]
    grids: dict[str, Grids]
    seeds: list[int]
    tuning_seeds: list[int]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    kfac: KFACSettings = KFACSettings()
    warmup_steps: int = 20
    threads: int = 1


def _median(values: list[float]) -> float:
    """Median where NaN counts as +inf (a miss); +inf for no values."""
    return statistics.median([math.inf if math.isnan(v) else v for v in values]) if values else math.inf


def _to(run: RunRecord, key: str, unit: str = "steps") -> float:
    """Steps (or seconds) of `run` to target `key`; +inf if not reached."""
    value = getattr(run, f"{unit}_to_{key}")
    return math.inf if value is None else float(value)


def _to_all(run: RunRecord, targets: tuple[str, ...], unit: str = "steps") -> float:
    """Steps (or seconds) of `run` until every target is reached; +inf if one is not."""
    return max(_to(run, key, unit) for key in targets)


def tuning_score(runs: list[RunRecord], targets: tuple[str, ...]) -> tuple[float, float, float]:
    """Sort key of a grid point: median steps to every target, median summed steps, median last loss."""
    summed = [sum(_to(r, key) for key in targets) for r in runs]
    last = [r.train_loss[-1] for r in runs]
    return _median([_to_all(r, targets) for r in runs]), _median(summed), _median(last)


def grid_edges(best: Hyper, grid: list[Hyper]) -> list[str]:
    """Names of the hyperparameters whose chosen value is the smallest or largest of the grid (if it has > 1)."""
    edges = []
    for name, value in best.items():
        values = sorted({h[name] for h in grid})
        if len(values) > 1 and value in (values[0], values[-1]):
            edges.append(name)
    return edges


def best_first_order(methods: dict[str, Any], key: str, unit: str) -> str | None:
    """The first-order method with the lowest median ``unit`` to target ``key`` (None if none reached it)."""
    reached = [(m[key][f"median_{unit}"], name) for name, m in methods.items() if name in FIRST_ORDER]
    reached = [(value, name) for value, name in reached if value is not None]
    return min(reached)[1] if reached else None


def summarize(runs: list[RunRecord], best: dict[str, Hyper], targets: tuple[str, ...]) -> dict[str, Any]:
    """Per-method medians over the measured seeds and each K-FAC method's ratios of medians, for one case.

    ``methods[method][key]`` per target and ``methods[method]["all"]`` until every target is reached.

    ``ratios[method][base][key][unit]``: the K-FAC method's median over ``base``'s, for ``base`` each first-order
    method and ``"best"`` (per target and unit, the first-order method with the lower median).
    """
    methods: dict[str, Any] = {}
    for method, hyper in best.items():
        mine = [r for r in runs if r.method == method]
        entry: dict[str, Any] = {"hyper": hyper, "runs": len(mine)}
        for key in targets:
            steps = [_to(r, key) for r in mine]
            entry[key] = {
                "reached": sum(math.isfinite(s) for s in steps),
                "median_steps": finite_or_none(_median(steps)),
                "median_seconds": finite_or_none(_median([_to(r, key, "seconds") for r in mine])),
            }
        entry["all"] = {
            "reached": sum(r.reached(targets) for r in mine),
            "median_steps": finite_or_none(_median([_to_all(r, targets) for r in mine])),
            "median_seconds": finite_or_none(_median([_to_all(r, targets, "seconds") for r in mine])),
        }
        entry["ms_per_step"] = finite_or_none(_median([r.ms_per_step() for r in mine]))
        if method not in FIRST_ORDER:
            taken = [r.steps[-1] for r in mine]
            entry["kl_clipped_fraction"] = sum(r.kl_clipped_steps for r in mine) / max(sum(taken), 1)
            scales = [r.kl_scale_median for r in mine if r.kl_scale_median is not None]
            entry["kl_scale_median"] = statistics.median(scales) if scales else None
            entry["final_damping"] = statistics.median([r.damping[-1] for r in mine]) if mine else None
        methods[method] = entry

    def ratio(method: str, base: str | None, key: str, unit: str) -> float | None:
        if base is None or base not in methods:
            return None
        mine, theirs = methods[method][key][f"median_{unit}"], methods[base][key][f"median_{unit}"]
        return mine / theirs if mine is not None and theirs else None

    ratios: dict[str, Any] = {}
    for method in (m for m in methods if m not in FIRST_ORDER):
        ratios[method] = {
            base: {key: {unit: ratio(method, base, key, unit) for unit in UNITS} for key in targets}
            for base in [*(m for m in FIRST_ORDER if m in methods)]
        }
        ratios[method]["best"] = {
            key: {unit: ratio(method, best_first_order(methods, key, unit), key, unit) for unit in UNITS}
            for key in targets
        }
    best_names = {key: {unit: best_first_order(methods, key, unit) for unit in UNITS} for key in targets}
    return {"methods": methods, "ratios": ratios, "best_first_order": best_names}


def tune(
    task: Task, data: tuple[Split, Split], settings: Settings, log: Log
) -> tuple[list[RunRecord], dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """Run every grid point on the tuning seeds; return the runs, each method's best point and the grid scores."""
    runs: list[RunRecord] = []
    prune = len(settings.tuning_seeds) == 1
    for seed in settings.tuning_seeds:
        for method in settings.methods:
            needed = task.max_steps
            for hyper in settings.grids[task.name][method]:
                r = train_run(task, data, method, hyper, seed, settings.kfac, phase="tuning", stop_at_targets=True,
                              max_steps=needed)  # fmt: skip
                runs.append(r)
                if prune and r.reached(task.targets):
                    needed = min(needed, int(_to_all(r, task.targets)))
                log(f"[tune {task.key} seed {seed}] {method} {hyper}: " + _progress(r, task))
    best: dict[str, Hyper] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for method in settings.methods:
        scored = [
            (tuning_score([r for r in runs if r.method == method and r.hyper == h], task.targets), h)
            for h in settings.grids[task.name][method]
        ]
        best[method] = min(scored, key=lambda item: item[0])[1]
        scores[method] = [
            {"hyper": h, "median_steps_to_all": finite_or_none(s[0]), "median_summed_steps": finite_or_none(s[1])}
            for s, h in scored
        ]
        log(f"[tune {task.key}] {method}: best {best[method]}")
    return runs, best, scores


def _progress(r: RunRecord, task: Task) -> str:
    parts = [f"{key} target at {getattr(r, f'steps_to_{key}')}" for key in task.targets]
    return ", ".join(parts) + f", last loss {r.train_loss[-1]:.4f}, {r.ms_per_step():.2f} ms/step"


def measure(
    task: Task, data: tuple[Split, Split], best: dict[str, Hyper], settings: Settings, log: Log
) -> list[RunRecord]:
    """Run the tuned methods interleaved on every measured seed (the order rotates with the seed).

    A measured run ends at the checkpoint where it has reached every target (or at the budget).
    """
    runs: list[RunRecord] = []
    methods = settings.methods
    for i, seed in enumerate(settings.seeds):
        shift = i % len(methods)
        for method in methods[shift:] + methods[:shift]:
            r = train_run(task, data, method, best[method], seed, settings.kfac, phase="measure", stop_at_targets=True)
            runs.append(r)
            log(f"[measure {task.key} seed {seed}] {method}: " + _progress(r, task))
    return runs


def run_benchmark(settings: Settings, log: Log = print) -> dict[str, Any]:
    """Tune, then measure, every case with one thread; return the results (JSON-ready, without ``meta``)."""
    for task in settings.tasks:
        unknown = sorted(set(settings.methods) - set(settings.grids.get(task.name, {})))
        if unknown:
            raise ValueError(f"{task.name}: methods without a grid: {', '.join(unknown)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {"tasks": {}, "runs": []}
    loaded: dict[str, tuple[Split, Split]] = {}
    try:
        for task in settings.tasks:
            data = loaded.setdefault(task.data, load_task_data(task))
            warmup = max(3, settings.warmup_steps * 64 // task.batch_size)  # as many examples as 20 steps of 64
            for method in settings.methods:  # untimed warm-up, discarded: the first call of every kernel is slow
                train_run(task, data, method, settings.grids[task.name][method][0], 0, settings.kfac, phase="warmup",
                          stop_at_targets=False, max_steps=warmup)  # fmt: skip
            tuning, best, scores = tune(task, data, settings, log)
            measured = measure(task, data, best, settings, log)
            summary = summarize(measured, best, task.targets)
            for method in settings.methods:
                grid = settings.grids[task.name][method]
                summary["methods"][method]["grid_edges"] = grid_edges(best[method], grid)
            summary.update(
                grid=scores, task=task.to_json(), sizes={"train": len(data[0].labels), "test": len(data[1].labels)}
            )
            results["tasks"][task.key] = summary
            results["runs"] += [r.to_json() for r in tuning + measured]
    finally:
        torch.set_num_threads(previous_threads)
    return results


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments: the quick default or ``--full``; explicit options override either.

    The quick default runs every task at the first batch size of its sweep; ``--full`` runs the whole sweeps;
    ``--batch-sizes`` picks sizes for every task.
    """
    full = bool(args.full)
    tasks = []
    for name in args.tasks:
        base = TASKS[name]
        sizes = args.batch_sizes or ([p.batch_size for p in base.sweep] if full else [base.sweep[0].batch_size])
        for size in sizes:
            task = base.at(size)
            tasks.append(
                replace(task, max_steps=args.max_steps or task.max_steps, eval_every=args.eval_every or task.eval_every)
            )
    n_seeds = args.seeds if args.seeds is not None else (5 if full else 2)
    n_tuning = args.tuning_seeds if args.tuning_seeds is not None else 1
    return Settings(
        tasks=tasks,
        grids=FULL_GRIDS if full else QUICK_GRIDS,
        seeds=list(range(n_seeds)),
        tuning_seeds=list(range(100, 100 + n_tuning)),
        methods=list(args.methods),
        kfac=KFACSettings(factor_update_steps=args.factor_update_steps, inv_update_steps=args.inv_update_steps),
        warmup_steps=args.warmup_steps,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench convergence``."""
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS), help="tasks to run")
    parser.add_argument(
        "--batch-sizes", nargs="+", type=positive_int, help="batch sizes for every task (default: the first of each "
        "task's sweep; --full: the whole sweep)",
    )  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS), help="methods to run")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON",
        help="instead of running, combine earlier runs' results (their --out .json, distinct cases) into one report",
    )  # fmt: skip
    parser.add_argument("--seeds", type=positive_int, help="measured seeds 0..N-1 (default 2; --full 5)")
    parser.add_argument("--tuning-seeds", type=positive_int, help="tuning seeds 100..99+N (default 1)")
    parser.add_argument("--max-steps", type=positive_int, help="override every task's step budget")
    parser.add_argument("--eval-every", type=positive_int, help="override every task's checkpoint period")
    parser.add_argument("--factor-update-steps", type=positive_int, default=10, help="K-FAC factor update period")
    parser.add_argument(
        "--inv-update-steps", type=positive_int, help="K-FAC decomposition period (default: the task's per batch size)"
    )
    parser.add_argument(
        "--warmup-steps", type=positive_int, default=20,
        help="untimed warm-up steps per method and case at batch 64 (as many examples at other sizes, >= 3 steps)",
    )  # fmt: skip


def merge(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results of several runs (their ``--out`` JSON files) as one: their cases, runs and, in ``parts``, metas.

    Raises:
        ValueError: naming the file, if one is not a convergence result or repeats a case of an earlier one.
    """
    results: dict[str, Any] = {"tasks": {}, "runs": [], "parts": []}
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
            tasks, runs, meta = part["tasks"], part["runs"], part["meta"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--merge {path}: not a convergence benchmark result ({error})") from error
        repeated = sorted(set(tasks) & set(results["tasks"]))
        if repeated:
            raise ValueError(f"--merge {path}: case {', '.join(repeated)} is already in an earlier file")
        for key, summary in tasks.items():  # the summary again from the runs: a part from an older version agrees
            measured = [RunRecord.from_json(r) for r in runs if r["task"] == key and r["phase"] == "measure"]
            best = {method: entry["hyper"] for method, entry in summary["methods"].items()}
            edges = {method: entry.get("grid_edges", []) for method, entry in summary["methods"].items()}
            targets = ("loss",) if summary["task"]["acc_target"] is None else ("loss", "acc")
            summary.update(summarize(measured, best, targets))
            for method, edge in edges.items():
                summary["methods"][method]["grid_edges"] = edge
        results["tasks"].update(tasks)
        results["runs"] += runs
        results["parts"].append(meta | {"file": str(path)})
    settings = results["parts"][0].get("settings", {}) | {"merged": [str(p) for p in paths]}
    return results, settings


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the benchmark of parsed options (or merge earlier runs' results); the results and the settings."""
    if args.merge:
        return merge(args.merge)
    settings = settings_from_args(args)
    return run_benchmark(settings, log), asdict(settings) | {"tasks": [t.to_json() for t in settings.tasks]}
