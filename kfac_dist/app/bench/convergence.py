"""Convergence benchmark: steps and wall time to a target, SGD-momentum + K-FAC vs SGD-momentum vs Adam.

Protocol: docs/BENCHMARKS.md section 2.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from kfac_dist.app.bench.common import Log, positive_int
from kfac_dist.app.bench.convergence_runs import (
    METHODS,
    TASKS,
    Hyper,
    KFACSettings,
    RunRecord,
    Task,
    finite_or_none,
    load_task_data,
    train_run,
)
from kfac_dist.app.data.mnist import Split

__all__ = ["FULL", "FULL_GRIDS", "QUICK_GRIDS", "Settings", "add_arguments", "run", "run_benchmark", "summarize"]

FULL = "5 measured seeds, full grids (the docs/ run)"

FULL_GRIDS: dict[str, list[Hyper]] = {
    "sgd": [{"lr": lr} for lr in (0.01, 0.03, 0.1, 0.3)],
    "adam": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)],
    "kfac": [{"lr": lr, "damping": d} for lr in (0.01, 0.03, 0.1, 0.3) for d in (0.1, 0.3, 1.0)],
}
QUICK_GRIDS: dict[str, list[Hyper]] = {
    "sgd": [{"lr": lr} for lr in (0.03, 0.1)],
    "adam": [{"lr": lr} for lr in (3e-3, 1e-2)],
    "kfac": [{"lr": lr, "damping": d} for lr in (0.03, 0.1) for d in (0.3, 1.0)],
}


@dataclass
class Settings:
    """Everything a benchmark run depends on (stored in the JSON)."""

    tasks: list[Task]
    grids: dict[str, list[Hyper]]
    seeds: list[int]
    tuning_seeds: list[int]
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


def tuning_score(runs: list[RunRecord]) -> tuple[float, float, float]:
    """Sort key of a grid point: median steps to both targets, median summed steps, median final loss."""
    both = [max(_to(r, "loss"), _to(r, "acc")) for r in runs]
    summed = [_to(r, "loss") + _to(r, "acc") for r in runs]
    return _median(both), _median(summed), _median([r.train_loss[-1] for r in runs])


def grid_edges(best: Hyper, grid: list[Hyper]) -> list[str]:
    """Names of the hyperparameters whose chosen value is the smallest or largest of the grid (if it has > 1)."""
    edges = []
    for name, value in best.items():
        values = sorted({h[name] for h in grid})
        if len(values) > 1 and value in (values[0], values[-1]):
            edges.append(name)
    return edges


def summarize(runs: list[RunRecord], best: dict[str, Hyper]) -> dict[str, Any]:
    """Per-method medians over the measured seeds and K-FAC's ratios of medians, for one task."""
    methods: dict[str, Any] = {}
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        entry: dict[str, Any] = {"hyper": best[method], "runs": len(mine)}
        for key in ("loss", "acc"):
            steps = [_to(r, key) for r in mine]
            entry[key] = {
                "reached": sum(math.isfinite(s) for s in steps),
                "median_steps": finite_or_none(_median(steps)),
                "median_seconds": finite_or_none(_median([_to(r, key, "seconds") for r in mine])),
            }
        entry["ms_per_step"] = finite_or_none(_median([r.ms_per_step() for r in mine]))
        entry["final_train_loss"] = finite_or_none(_median([r.train_loss[-1] for r in mine]))
        entry["final_test_acc"] = statistics.median([r.test_acc[-1] for r in mine]) if mine else None
        methods[method] = entry

    def ratio(base: str, key: str, unit: str) -> float | None:
        mine, theirs = methods["kfac"][key][f"median_{unit}"], methods[base][key][f"median_{unit}"]
        return mine / theirs if mine is not None and theirs else None

    units = ("steps", "seconds")
    ratios = {f"kfac/{b}": {k: {u: ratio(b, k, u) for u in units} for k in ("loss", "acc")} for b in ("sgd", "adam")}
    return {"methods": methods, "ratios": ratios}


def tune(
    task: Task, data: tuple[Split, Split], settings: Settings, log: Log
) -> tuple[list[RunRecord], dict[str, Hyper], dict[str, list[dict[str, Any]]]]:
    """Run every grid point on the tuning seeds; return the runs, each method's best point and the grid scores."""
    runs: list[RunRecord] = []
    for seed in settings.tuning_seeds:
        for method in METHODS:
            for hyper in settings.grids[method]:
                r = train_run(task, data, method, hyper, seed, settings.kfac, phase="tuning", stop_at_targets=True)
                runs.append(r)
                log(
                    f"[tune {task.name} seed {seed}] {method} {hyper}: loss target at {r.steps_to_loss}, "
                    f"accuracy target at {r.steps_to_acc}, last loss {r.train_loss[-1]:.4f}"
                )
    best: dict[str, Hyper] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        scored = [
            (tuning_score([r for r in runs if r.method == method and r.hyper == hyper]), hyper)
            for hyper in settings.grids[method]
        ]
        best[method] = min(scored, key=lambda item: item[0])[1]
        scores[method] = [
            {"hyper": h, "median_steps_to_both": finite_or_none(s[0]), "median_summed_steps": finite_or_none(s[1])}
            for s, h in scored
        ]
        log(f"[tune {task.name}] {method}: best {best[method]}")
    return runs, best, scores


def measure(
    task: Task, data: tuple[Split, Split], best: dict[str, Hyper], settings: Settings, log: Log
) -> list[RunRecord]:
    """Run the tuned methods interleaved on every measured seed (the order rotates with the seed)."""
    runs: list[RunRecord] = []
    for i, seed in enumerate(settings.seeds):
        shift = i % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            r = train_run(task, data, method, best[method], seed, settings.kfac, phase="measure", stop_at_targets=False)
            runs.append(r)
            log(
                f"[measure {task.name} seed {seed}] {method}: loss target at {r.steps_to_loss} steps / "
                f"{r.seconds_to_loss} s, accuracy target at {r.steps_to_acc} / {r.seconds_to_acc} s, "
                f"{r.ms_per_step():.2f} ms/step"
            )
    return runs


def run_benchmark(settings: Settings, log: Log = print) -> dict[str, Any]:
    """Tune, then measure, every task with one thread; return the results (JSON-ready, without ``meta``)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {"tasks": {}, "runs": []}
    try:
        for task in settings.tasks:
            data = load_task_data(task)
            for method in METHODS:  # untimed warm-up, discarded: the first call of every kernel is slow
                hyper = settings.grids[method][0]
                train_run(task, data, method, hyper, 0, settings.kfac, phase="warmup", stop_at_targets=False,
                          max_steps=settings.warmup_steps)  # fmt: skip
            tuning, best, scores = tune(task, data, settings, log)
            measured = measure(task, data, best, settings, log)
            summary = summarize(measured, best)
            for method in METHODS:
                summary["methods"][method]["grid_edges"] = grid_edges(best[method], settings.grids[method])
            summary.update(
                grid=scores, task=task.to_json(), sizes={"train": len(data[0].labels), "test": len(data[1].labels)}
            )
            results["tasks"][task.name] = summary
            results["runs"] += [r.to_json() for r in tuning + measured]
    finally:
        torch.set_num_threads(previous_threads)
    return results


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments: the quick default or ``--full``; explicit options override either."""
    full = bool(args.full)
    tasks = [
        replace(TASKS[name], max_steps=args.max_steps or TASKS[name].max_steps,
                eval_every=args.eval_every or TASKS[name].eval_every)
        for name in args.tasks
    ]  # fmt: skip
    n_seeds = args.seeds if args.seeds is not None else (5 if full else 2)
    n_tuning = args.tuning_seeds if args.tuning_seeds is not None else 1
    return Settings(
        tasks=tasks,
        grids=FULL_GRIDS if full else QUICK_GRIDS,
        seeds=list(range(n_seeds)),
        tuning_seeds=list(range(100, 100 + n_tuning)),
        kfac=KFACSettings(factor_update_steps=args.factor_update_steps, inv_update_steps=args.inv_update_steps),
        warmup_steps=args.warmup_steps,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench convergence``."""
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS), help="tasks to run")
    parser.add_argument("--seeds", type=positive_int, help="measured seeds 0..N-1 (default 2; --full 5)")
    parser.add_argument("--tuning-seeds", type=positive_int, help="tuning seeds 100..99+N (default 1)")
    parser.add_argument("--max-steps", type=positive_int, help="override every task's step budget")
    parser.add_argument("--eval-every", type=positive_int, help="override every task's checkpoint period")
    parser.add_argument("--factor-update-steps", type=positive_int, default=10, help="K-FAC factor update period")
    parser.add_argument("--inv-update-steps", type=positive_int, default=100, help="K-FAC decomposition period")
    parser.add_argument("--warmup-steps", type=positive_int, default=20, help="untimed warm-up steps per method, task")


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the benchmark of parsed options; the results and the settings."""
    settings = settings_from_args(args)
    return run_benchmark(settings, log), asdict(settings) | {"tasks": [t.to_json() for t in settings.tasks]}
