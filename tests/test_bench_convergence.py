"""The convergence benchmark on tiny configurations: outputs exist and their numbers agree with the curves.

No timing assertions: only consistency (targets read off the recorded curves, medians, ratios, tuning choice,
interleaving, shared initial weights).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kfac_dist.app.bench import convergence_report
from kfac_dist.app.bench.convergence import Settings, run_benchmark, summarize, tuning_score
from kfac_dist.app.bench.convergence_runs import METHOD_TITLES, METHODS, TASKS, RunRecord, batch_order
from kfac_dist.app.cli import main

# Loose targets so that a few steps reach them; an unreachable accuracy target is checked separately.
TINY_MNIST = replace(TASKS["mnist5k_cnn"], max_steps=6, eval_every=2, loss_target=2.1, acc_target=0.3)
TINY_GRIDS = {"sgd": [{"lr": 0.03}, {"lr": 0.1}], "adam": [{"lr": 3e-3}], "kfac": [{"lr": 0.1, "damping": 1.0}]}


@pytest.fixture(scope="module")
def tiny_results() -> dict[str, Any]:
    settings = Settings(tasks=[TINY_MNIST], grids=TINY_GRIDS, seeds=[0, 1], tuning_seeds=[100], warmup_steps=2)
    return run_benchmark(settings, log=lambda line: None)


def _median(values: list[float]) -> float | None:
    value = statistics.median(values)
    return value if math.isfinite(value) else None


def first_crossing(values: list[float], target: float, below: bool) -> int | None:
    """The test's own reading of a curve: the first index ``<= target`` (``below``) or ``>= target``; None if none."""
    for i, v in enumerate(values):
        if math.isfinite(v) and (v <= target if below else v >= target):
            return i
    return None


def check_run(run: dict[str, Any], loss_target: float, acc_target: float, max_steps: int) -> None:
    """Steps / seconds to each target are the first checkpoint where the recorded curve crosses it."""
    losses = [math.inf if v is None else v for v in run["train_loss"]]
    for key, values, target, below in (
        ("loss", losses, loss_target, True),
        ("acc", run["test_acc"], acc_target, False),
    ):
        index = first_crossing(values, target, below)
        if index is None:
            assert run[f"steps_to_{key}"] is None and run[f"seconds_to_{key}"] is None
        else:
            assert run[f"steps_to_{key}"] == run["steps"][index]
            assert run[f"seconds_to_{key}"] == run["seconds"][index]
    assert run["steps"][0] == 0 and run["seconds"][0] == 0.0
    assert run["steps"] == sorted(run["steps"]) and run["seconds"] == sorted(run["seconds"])
    if run["phase"] == "measure" and not run["diverged"]:
        assert run["steps"][-1] == max_steps  # measured runs use the whole budget
    assert len(run["steps"]) == len(run["seconds"]) == len(run["train_loss"]) == len(run["test_acc"])


def check_summary(results: dict[str, Any]) -> None:
    """Medians, reached counts and ratios recomputed from the measured runs equal the summary."""
    for name, summary in results["tasks"].items():
        task = summary["task"]
        runs = [r for r in results["runs"] if r["task"] == name]
        for r in runs:
            check_run(r, task["loss_target"], task["acc_target"], task["max_steps"])
        for method in METHODS:
            mine = [r for r in runs if r["phase"] == "measure" and r["method"] == method]
            entry = summary["methods"][method]
            assert {json.dumps(r["hyper"]) for r in mine} == {json.dumps(entry["hyper"])}
            for key in ("loss", "acc"):
                steps = [math.inf if r[f"steps_to_{key}"] is None else r[f"steps_to_{key}"] for r in mine]
                secs = [math.inf if r[f"seconds_to_{key}"] is None else r[f"seconds_to_{key}"] for r in mine]
                assert entry[key]["reached"] == sum(math.isfinite(s) for s in steps)
                assert entry[key]["median_steps"] == _median(steps)
                assert entry[key]["median_seconds"] == pytest.approx(_median(secs))
        for base in ("sgd", "adam"):
            for key in ("loss", "acc"):
                for unit in ("steps", "seconds"):
                    mine, theirs = (summary["methods"][m][key][f"median_{unit}"] for m in ("kfac", base))
                    expected = None if mine is None or not theirs else mine / theirs
                    assert summary["ratios"][f"kfac/{base}"][key][unit] == pytest.approx(expected)


def test_tiny_run_is_consistent(tiny_results: dict[str, Any]) -> None:
    check_summary(tiny_results)
    summary = tiny_results["tasks"]["mnist5k_cnn"]
    assert summary["sizes"] == {"train": 4000, "test": 1000}
    measured = [r for r in tiny_results["runs"] if r["phase"] == "measure"]
    # interleaved: per seed the three methods back to back, the order rotating with the seed
    assert [(r["seed"], r["method"]) for r in measured] == [
        (0, "sgd"), (0, "adam"), (0, "kfac"), (1, "adam"), (1, "kfac"), (1, "sgd"),
    ]  # fmt: skip
    for seed in (0, 1):  # same initial weights for every method of a seed
        initial = {r["train_loss"][0] for r in measured if r["seed"] == seed}
        assert len(initial) == 1
    # with these loose targets every measured run reaches both, so every ratio is a number
    for r in measured:
        assert r["steps_to_loss"] is not None and r["steps_to_acc"] is not None
    assert all(v is not None for ratio in summary["ratios"].values() for t in ratio.values() for v in t.values())


def test_tuning_picks_the_best_grid_point(tiny_results: dict[str, Any]) -> None:
    tuning = [r for r in tiny_results["runs"] if r["phase"] == "tuning"]
    assert len(tuning) == sum(len(g) for g in TINY_GRIDS.values())  # one tuning seed
    for r in tuning:  # tuning runs stop at the first checkpoint where both targets are reached
        if r["steps_to_loss"] is not None and r["steps_to_acc"] is not None:
            assert r["steps"][-1] == max(r["steps_to_loss"], r["steps_to_acc"])
    summary = tiny_results["tasks"]["mnist5k_cnn"]
    sgd = [p["median_steps_to_both"] for p in summary["grid"]["sgd"]]
    best = summary["methods"]["sgd"]["hyper"]
    assert summary["grid"]["sgd"][[p["hyper"] for p in summary["grid"]["sgd"]].index(best)]["median_steps_to_both"] == (
        min(s for s in sgd if s is not None)
    )


def test_markdown_and_json_agree(tiny_results: dict[str, Any]) -> None:
    text = convergence_report.markdown(json.loads(json.dumps(tiny_results)))
    summary = tiny_results["tasks"]["mnist5k_cnn"]
    assert "## MNIST-5k, small CNN" in text and "Issue target" in text
    for method in METHODS:  # the table row of each method holds its medians
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {METHOD_TITLES[method]} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        entry = summary["methods"][method]
        assert cells[2:8] == [
            f"{entry['loss']['reached']}/2", f"{entry['loss']['median_steps']:.0f}",
            f"{entry['loss']['median_seconds']:.3g}", f"{entry['acc']['reached']}/2",
            f"{entry['acc']['median_steps']:.0f}", f"{entry['acc']['median_seconds']:.3g}",
        ]  # fmt: skip
    (row,) = [line for line in text.splitlines() if line.startswith("| K-FAC / SGD-momentum 0.9 |")]
    ratios = summary["ratios"]["kfac/sgd"]
    expected = [f"{ratios[k][u]:.2f}x" for k in ("loss", "acc") for u in ("steps", "seconds")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == expected


def test_not_reached_counts_as_infinite() -> None:
    def record(method: str, seed: int, steps_to_loss: int | None) -> RunRecord:
        r = RunRecord("t", "measure", method, {"lr": 0.1}, seed, [0, 10], [0.0, 1.0], [2.0, 0.5], [0.1, 0.9])
        r.steps_to_loss, r.seconds_to_loss = steps_to_loss, None if steps_to_loss is None else steps_to_loss / 10
        return r

    runs = [record("sgd", s, 10) for s in range(3)]
    runs += [record("adam", 0, None), record("adam", 1, None), record("adam", 2, 10)]
    runs += [record("kfac", 0, None), record("kfac", 1, 10), record("kfac", 2, 10)]
    summary = summarize(runs, {m: {"lr": 0.1} for m in METHODS})
    assert summary["methods"]["adam"]["loss"] == {"reached": 1, "median_steps": None, "median_seconds": None}
    assert summary["methods"]["kfac"]["loss"] == {"reached": 2, "median_steps": 10.0, "median_seconds": 1.0}
    assert summary["ratios"]["kfac/sgd"]["loss"]["steps"] == 1.0
    assert summary["ratios"]["kfac/adam"]["loss"]["steps"] is None
    assert summary["methods"]["sgd"]["acc"]["reached"] == 0
    assert tuning_score(runs[:3])[0] == math.inf  # the accuracy target was missed: not reached
    assert first_crossing([2.0, math.nan, 0.4, 0.1], 0.5, below=True) == 2
    assert first_crossing([0.1, 0.97, 0.99], 0.98, below=False) == 2
    assert first_crossing([0.1], 0.98, below=False) is None


def test_batch_order_is_epochs_of_permutations() -> None:
    order = batch_order(100, 32, 7, seed=3)
    assert order.shape == (7, 32)
    first_epoch = order[:3].flatten()
    assert len(set(first_epoch.tolist())) == 96  # no repeats within an epoch (the last 4 dropped)
    assert (order == batch_order(100, 32, 7, seed=3)).all()


def test_cli_quick_run_writes_all_outputs(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the digits task needs requirements/bench.txt")
    pytest.importorskip("matplotlib", reason="the PNG curves need requirements/bench.txt")
    out = tmp_path / "conv"
    argv = ["bench", "convergence", "--tasks", "digits_mlp", "--seeds", "1", "--max-steps", "20", "--eval-every", "5"]
    assert main([*argv, "--warmup-steps", "2", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    check_summary(results)
    assert results["tasks"]["digits_mlp"]["sizes"] == {"train": 1438, "test": 359}
    assert results["meta"]["command"].startswith("kfac-dist bench convergence --tasks digits_mlp --seeds 1")
    assert results["meta"]["threads"] == 1
    text = out.with_suffix(".md").read_text()
    assert results["meta"]["command"] in text and "sklearn digits" in text
    png = Path(f"{out}_digits_mlp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
