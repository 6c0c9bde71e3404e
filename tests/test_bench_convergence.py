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
import torch
import torch.nn.functional as F

from kfac_dist.app.bench import convergence_report
from kfac_dist.app.bench.convergence import Settings, best_first_order, merge, run_benchmark, summarize, tuning_score
from kfac_dist.app.bench.convergence_methods import FIRST_ORDER, KFAC_METHODS, METHODS
from kfac_dist.app.bench.convergence_runs import TASKS, RunRecord, batch_order, evaluate, load_task_data
from kfac_dist.app.cli import main

# Loose targets so that a few steps reach them; an unreachable accuracy target is checked separately.
TINY_MNIST = replace(TASKS["mnist5k_cnn"].at(64), max_steps=6, eval_every=2, loss_target=2.1, acc_target=0.3)
TINY_GRIDS: dict[str, list[dict[str, float]]] = {
    "sgd": [{"lr": 0.03}, {"lr": 0.1}],
    "adam": [{"lr": 3e-3}],
} | {name: [{"lr": 0.1, "damping": 1.0}] for name in KFAC_METHODS}


@pytest.fixture(scope="module")
def tiny_results() -> dict[str, Any]:
    grids = {"mnist5k_cnn": TINY_GRIDS}
    settings = Settings(tasks=[TINY_MNIST], grids=grids, seeds=[0, 1], tuning_seeds=[100], warmup_steps=2)
    return run_benchmark(settings, log=lambda line: None)


def _median(values: list[float]) -> float | None:
    value = statistics.median(values)
    return value if math.isfinite(value) else None


def first_crossing(values: list[float | None], target: float, below: bool) -> int | None:
    """The test's own reading of a curve: the first index ``<= target`` (``below``) or ``>= target``; None if none."""
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v) and (v <= target if below else v >= target):
            return i
    return None


def check_run(run: dict[str, Any], task: dict[str, Any]) -> None:
    """Steps / seconds to each target are the first checkpoint where the recorded curve crosses it."""
    curves = {"loss": (run["train_loss"], task["loss_target"], True)}
    if task["acc_target"] is not None:
        curves["acc"] = (run["test_acc"], task["acc_target"], False)
    else:
        assert set(run["test_acc"]) == {None} and run["steps_to_acc"] is None
    for key, (values, target, below) in curves.items():
        index = first_crossing(values, target, below)
        if index is None:
            assert run[f"steps_to_{key}"] is None and run[f"seconds_to_{key}"] is None
        else:
            assert run[f"steps_to_{key}"] == run["steps"][index]
            assert run[f"seconds_to_{key}"] == run["seconds"][index]
    assert run["steps"][0] == 0 and run["seconds"][0] == 0.0
    assert run["steps"] == sorted(run["steps"]) and run["seconds"] == sorted(run["seconds"])
    reached = [run[f"steps_to_{key}"] for key in curves]
    if run["phase"] in ("measure", "tuning") and not run["diverged"]:
        # a run ends at the checkpoint where it has reached every target, otherwise at its budget
        assert run["steps"][-1] == (max(reached) if None not in reached else run["budget"])
    assert len(run["steps"]) == len(run["seconds"]) == len(run["train_loss"]) == len(run["test_acc"])
    if METHODS[run["method"]].is_kfac:
        assert len(run["damping"]) == len(run["steps"]) and 0 <= run["kl_clipped_steps"] <= run["steps"][-1]
    else:
        assert run["damping"] == [] and run["kl_clipped_steps"] == 0


def check_summary(results: dict[str, Any]) -> None:
    """Medians, reached counts and ratios recomputed from the measured runs equal the summary."""
    for name, summary in results["tasks"].items():
        task = summary["task"]
        targets = ("loss", "acc") if task["acc_target"] is not None else ("loss",)
        runs = [r for r in results["runs"] if r["task"] == name]
        for r in runs:
            check_run(r, task)
        for method, entry in summary["methods"].items():
            mine = [r for r in runs if r["phase"] == "measure" and r["method"] == method]
            assert {json.dumps(r["hyper"]) for r in mine} == {json.dumps(entry["hyper"])}
            for key in targets:
                steps = [math.inf if r[f"steps_to_{key}"] is None else r[f"steps_to_{key}"] for r in mine]
                secs = [math.inf if r[f"seconds_to_{key}"] is None else r[f"seconds_to_{key}"] for r in mine]
                assert entry[key]["reached"] == sum(math.isfinite(s) for s in steps)
                assert entry[key]["median_steps"] == _median(steps)
                assert entry[key]["median_seconds"] == pytest.approx(_median(secs))
            to_all = [
                math.inf if None in (steps := [r[f"steps_to_{k}"] for k in targets]) else max(steps) for r in mine
            ]
            assert entry["all"]["median_steps"] == _median(to_all)
            assert entry["all"]["reached"] == sum(math.isfinite(s) for s in to_all)
            if METHODS[method].is_kfac:
                clipped = sum(r["kl_clipped_steps"] for r in mine) / sum(r["steps"][-1] for r in mine)
                assert entry["kl_clipped_fraction"] == pytest.approx(clipped)
        for method, per_base in summary["ratios"].items():
            for base, per_key in per_base.items():
                for key in targets:
                    for unit in ("steps", "seconds"):
                        if base == "best":  # the first-order method with the lower median
                            values = [
                                summary["methods"][m][key][f"median_{unit}"]
                                for m in FIRST_ORDER
                                if m in summary["methods"]
                            ]
                            theirs = min((v for v in values if v is not None), default=None)
                        else:
                            theirs = summary["methods"][base][key][f"median_{unit}"]
                        mine = summary["methods"][method][key][f"median_{unit}"]
                        expected = None if mine is None or not theirs else mine / theirs
                        assert per_key[key][unit] == pytest.approx(expected)


def test_tiny_run_is_consistent(tiny_results: dict[str, Any]) -> None:
    check_summary(tiny_results)
    summary = tiny_results["tasks"]["mnist5k_cnn_b64"]
    assert summary["sizes"] == {"train": 4000, "test": 1000}
    measured = [r for r in tiny_results["runs"] if r["phase"] == "measure"]
    # interleaved: per seed every method back to back, the order rotating with the seed
    order = list(TINY_GRIDS)
    assert [(r["seed"], r["method"]) for r in measured] == [(0, m) for m in order] + [
        (1, m) for m in order[1:] + order[:1]
    ]
    for seed in (0, 1):  # same initial weights for every method of a seed
        initial = {r["train_loss"][0] for r in measured if r["seed"] == seed}
        assert len(initial) == 1
    # with these loose targets every measured run reaches both, so every ratio is a number
    for r in measured:
        assert r["steps_to_loss"] is not None and r["steps_to_acc"] is not None
    assert set(summary["ratios"]) == set(KFAC_METHODS)
    assert all(
        v is not None for per_base in summary["ratios"].values() for t in per_base.values() for u in t.values()
        for v in u.values()
    )  # fmt: skip


def test_kfac_variants_record_their_options(tiny_results: dict[str, Any]) -> None:
    """Fixed damping stays put; without KL-clip no step is clipped and no scale is recorded."""
    runs = [r for r in tiny_results["runs"] if r["phase"] == "measure"]
    for r in runs:
        if r["method"] in ("kfac", "kfac_mc", "kfac_noclip"):
            assert set(r["damping"]) == {r["hyper"]["damping"]}
        if r["method"] == "kfac_noclip":
            assert r["kl_clipped_steps"] == 0 and r["kl_scale_median"] is None
        elif METHODS[r["method"]].is_kfac:
            assert 0 < r["kl_scale_median"] <= 1.0


def test_tuning_picks_the_best_grid_point(tiny_results: dict[str, Any]) -> None:
    tuning = [r for r in tiny_results["runs"] if r["phase"] == "tuning"]
    assert len(tuning) == sum(len(g) for g in TINY_GRIDS.values())  # one tuning seed
    summary = tiny_results["tasks"]["mnist5k_cnn_b64"]
    sgd = [p["median_steps_to_all"] for p in summary["grid"]["sgd"]]
    best = summary["methods"]["sgd"]["hyper"]
    assert summary["grid"]["sgd"][[p["hyper"] for p in summary["grid"]["sgd"]].index(best)]["median_steps_to_all"] == (
        min(s for s in sgd if s is not None)
    )
    # with one tuning seed, a later grid point runs at most as long as the best earlier point needed
    first, second = [r for r in tuning if r["method"] == "sgd"]
    reached = [first["steps_to_loss"], first["steps_to_acc"]]
    needed = TINY_MNIST.max_steps if None in reached else max(reached)
    assert first["budget"] == TINY_MNIST.max_steps and second["budget"] == needed


def test_markdown_and_json_agree(tiny_results: dict[str, Any]) -> None:
    text = convergence_report.markdown(json.loads(json.dumps(tiny_results)))
    summary = tiny_results["tasks"]["mnist5k_cnn_b64"]
    assert "## MNIST-5k, small CNN, batch 64" in text and "## The issue's targets" in text
    for method, entry in summary["methods"].items():  # the table row of each method holds its medians
        rows = [line for line in text.splitlines() if line.startswith(f"| {METHODS[method].title} |")]
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[2:8] == [
            f"{entry['loss']['reached']}/2", f"{entry['loss']['median_steps']:.0f}",
            f"{entry['loss']['median_seconds']:.3g}", f"{entry['acc']['reached']}/2",
            f"{entry['acc']['median_steps']:.0f}", f"{entry['acc']['median_seconds']:.3g}",
        ]  # fmt: skip
    section = text.split("## K-FAC's variants")[1].split("## ")[0]
    (variants,) = [line for line in section.splitlines() if line.startswith("| `mnist5k_cnn_b64` | ")]
    expected_cells = [
        f"{summary['methods'][m]['all']['median_steps']:.0f} ({summary['methods'][m]['all']['median_seconds']:.3g})"
        for m in KFAC_METHODS
    ]
    assert [c.strip() for c in variants.strip("|").split("|")][1:] == expected_cells
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {METHODS['kfac'].title} / best first-order |")]
    ratios = summary["ratios"]["kfac"]["best"]
    expected = [f"{ratios[k][u]:.2f}x" for k in ("loss", "acc") for u in ("steps", "seconds")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == expected


def test_not_reached_counts_as_infinite() -> None:
    def record(method: str, seed: int, steps_to_loss: int | None) -> RunRecord:
        r = RunRecord("t", "measure", method, {"lr": 0.1}, seed, [0, 10], [0.0, 1.0], [2.0, 0.5], [0.1, 0.9], [1.0])
        r.steps_to_loss, r.seconds_to_loss = steps_to_loss, None if steps_to_loss is None else steps_to_loss / 10
        r.steps_to_acc, r.seconds_to_acc = 10, 1.0
        return r

    runs = [record("sgd", s, 20) for s in range(3)]
    runs += [record("adam", 0, None), record("adam", 1, None), record("adam", 2, 10)]
    runs += [record("kfac", 0, None), record("kfac", 1, 10), record("kfac", 2, 10)]
    summary = summarize(runs, {m: {"lr": 0.1} for m in ("sgd", "adam", "kfac")}, ("loss", "acc"))
    assert summary["methods"]["adam"]["loss"] == {"reached": 1, "median_steps": None, "median_seconds": None}
    assert summary["methods"]["kfac"]["loss"] == {"reached": 2, "median_steps": 10.0, "median_seconds": 1.0}
    assert summary["ratios"]["kfac"]["sgd"]["loss"]["steps"] == 0.5
    assert summary["ratios"]["kfac"]["adam"]["loss"]["steps"] is None
    assert summary["ratios"]["kfac"]["best"]["loss"]["steps"] == 0.5  # Adam missed: SGD is the best first-order
    assert best_first_order(summary["methods"], "loss", "steps") == "sgd"
    assert best_first_order(summary["methods"], "acc", "steps") == "adam"  # a tie (10 steps) goes to the name
    assert tuning_score(runs[3:6], ("loss", "acc"))[0] == math.inf  # the loss target was missed twice
    assert tuning_score(runs[3:6], ("acc",))[0] == 10
    assert first_crossing([2.0, math.nan, 0.4, 0.1], 0.5, below=True) == 2
    assert first_crossing([0.1, 0.97, 0.99], 0.98, below=False) == 2
    assert first_crossing([0.1, None], 0.98, below=False) is None


def test_task_sweep_and_autoencoder_loss() -> None:
    """A task at each size of its sweep takes that plan; the autoencoder's loss is the mean BCE over pixels."""
    base = TASKS["mnist5k_cnn"]
    for plan in base.sweep:
        task = base.at(plan.batch_size)
        assert (task.batch_size, task.max_steps, task.eval_every, task.inv_update_steps) == (
            plan.batch_size, plan.max_steps, plan.eval_every, plan.inv_update_steps,
        )  # fmt: skip
        assert task.key == f"mnist5k_cnn_b{plan.batch_size}" and task.to_json()["key"] == task.key
    assert [p.batch_size for p in base.sweep] == [64, 250, 1000, 4000]  # up to the whole training split
    auto = TASKS["mnist5k_autoencoder"].at(1000)
    assert auto.targets == ("loss",)
    train, test = load_task_data(auto)
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0  # pixel intensities
    model = auto.model.build(0)
    loss, acc = evaluate(model, auto, train, test)
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model(train.images), train.images.flatten(1))
    assert acc is None and loss == pytest.approx(float(expected), rel=1e-5)


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
    argv = ["bench", "convergence", "--tasks", "digits_mlp", "--batch-sizes", "32", "64", "--methods", "sgd", "kfac"]
    argv += ["--seeds", "1", "--max-steps", "20", "--eval-every", "5", "--warmup-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    check_summary(results)
    assert list(results["tasks"]) == ["digits_mlp_b32", "digits_mlp_b64"]
    assert results["tasks"]["digits_mlp_b64"]["sizes"] == {"train": 1438, "test": 359}
    assert set(results["tasks"]["digits_mlp_b64"]["methods"]) == {"sgd", "kfac"}
    assert results["meta"]["command"].startswith("kfac-dist bench convergence --tasks digits_mlp --batch-sizes 32 64")
    assert results["meta"]["threads"] == 1
    text = out.with_suffix(".md").read_text()
    assert results["meta"]["command"] in text and "sklearn digits" in text
    for png in (f"{out}_digits_mlp_b32.png", f"{out}_digits_mlp_b64.png", f"{out}_digits_mlp_sweep.png"):
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_method_without_a_grid() -> None:
    grids = {"mnist5k_cnn": {"sgd": [{"lr": 0.1}]}}
    settings = Settings(tasks=[TINY_MNIST], grids=grids, seeds=[0], tuning_seeds=[1], methods=["adam"])
    with pytest.raises(ValueError, match="mnist5k_cnn: methods without a grid: adam"):
        run_benchmark(settings, log=lambda line: None)


def test_merge_combines_cases_and_refuses_a_repeated_one(tiny_results: dict[str, Any], tmp_path: Path) -> None:
    first = tiny_results | {"meta": {"command": "kfac-dist bench convergence --batch-sizes 64", "settings": {}}}
    renamed = {key.replace("_b64", "_b65"): value for key, value in tiny_results["tasks"].items()}
    runs = [r | {"task": r["task"].replace("_b64", "_b65")} for r in tiny_results["runs"]]
    second = {"tasks": renamed, "runs": runs, "meta": {"command": "kfac-dist bench convergence --batch-sizes 65"}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(part))
    merged, settings = merge(paths)
    check_summary(merged)  # recomputed from the runs: the same numbers
    assert merged["tasks"]["mnist5k_cnn_b64"] == json.loads(json.dumps(tiny_results["tasks"]["mnist5k_cnn_b64"]))
    assert list(merged["tasks"]) == ["mnist5k_cnn_b64", "mnist5k_cnn_b65"]
    assert len(merged["runs"]) == 2 * len(tiny_results["runs"])
    assert [p["file"] for p in merged["parts"]] == [str(p) for p in paths] == settings["merged"]
    text = convergence_report.markdown(merged | {"meta": {"settings": settings}})
    assert "--batch-sizes 64" in text and "--batch-sizes 65" in text and "batch 64 (`mnist5k_cnn_b65`)" in text
    with pytest.raises(ValueError, match=r"--merge .*b.json: case mnist5k_cnn_b65 is already in an earlier file"):
        merge([paths[1], paths[1]])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--merge .*bad.json: not a convergence benchmark result"):
        merge([paths[0], tmp_path / "bad.json"])
