"""The scaling benchmark: the alpha-beta model on known inputs, and one tiny end-to-end run (seconds).

No timing thresholds (timings are noisy; the 15% criterion is the report's): the model is checked on made-up
kernels and networks, the run only for consistency (medians and errors recomputed from what the JSON stores,
predictions recomputed from the stored calibration).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kfac_dist.app import bench
from kfac_dist.app.bench import scaling, scaling_report
from kfac_dist.app.bench.common import PROXY, ModelSpec
from kfac_dist.app.bench.scaling import Settings, kernels_from, network_from, overheads_from, step_model
from kfac_dist.app.bench.scaling_model import (
    FRACTIONS,
    KFAC_PHASES,
    PHASES,
    Kernels,
    LinearFit,
    Network,
    StepModel,
    fit_line,
    predict_kfac,
    predict_sgd,
)
from kfac_dist.app.bench.scaling_runs import collective_worker
from kfac_dist.app.processes import GlooRunError, run_gloo
from kfac_dist.options import KFACOptions
from kfac_dist.planner import plan_model
from kfac_dist.work import LAYER_PHASES

OPS = ("allreduce", "reduce", "broadcast")
ZERO = LinearFit(0.0, 0.0)
#: No local work at all: the model's times are then its network terms alone.
NO_KERNELS = Kernels(gemm=ZERO, copy=ZERO, im2col=ZERO, finite=ZERO, eigh=ZERO, compute={8: 0.0})
KERNELS = Kernels(
    gemm=LinearFit(2e-6, 1e-10),
    copy=LinearFit(1e-6, 1e-10),
    im2col=LinearFit(1e-5, 3e-10),
    finite=LinearFit(5e-6, 5e-10),
    eigh=LinearFit(1e-5, 2e-9),
    compute={4: 0.006, 8: 0.01},
)
SLOW = Network("slow", dict.fromkeys(OPS, 1e-3), dict.fromkeys(OPS, 1e-8))
FAST = Network("fast", dict.fromkeys(OPS, 1e-5), dict.fromkeys(OPS, 1e-10))
#: One second per byte of the busiest member, no latency: the model's exchange times are byte counts.
PER_BYTE = Network("per byte", dict.fromkeys(OPS, 0.0), dict.fromkeys(OPS, 1.0))
CNN = ModelSpec("small_cnn", {"num_classes": 10}, (1, 28, 28))
TINY = Settings(
    proxy=ModelSpec("mlp", {"in_features": 64, "hidden": (32,), "num_classes": 10}, (1, 8, 8)),
    world_sizes=[1, 2],
    weak_batch=8,
    strong_global=8,
    block_steps=4,
    warmup_steps=1,
    freq=(2, 4),
    gemm_sizes=[(32, 32, 32), (64, 64, 64)],
    copy_bytes=[2**10, 2**14],
    im2col_shapes=[(2, 4, 4, 3), (4, 4, 8, 3)],
    eigh_sides=[8, 16],
    collective_bytes=[2**10, 2**14],
    collective_reps=2,
    compute_batches=[2, 16],
    tensor_counts=[4, 16],
    tiny_layers=4,
    predict_world_sizes=[1, 2, 4, 8],
    predict_strong_global=16,
)


@pytest.fixture(scope="module")
def cnn() -> StepModel:
    return step_model(CNN, (10, 100))


# ------------------------------------------------------------------------------------------------ model
def test_fit_line_recovers_a_known_line() -> None:
    xs = [1.0, 10.0, 100.0, 1000.0]
    fit = fit_line(xs, [3e-6 + 2e-9 * x for x in xs])
    assert fit.intercept == pytest.approx(3e-6) and fit.slope == pytest.approx(2e-9)
    assert fit(50.0) == pytest.approx(3e-6 + 1e-7)
    with pytest.raises(ValueError):
        fit_line([1.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_line([1.0, 2.0], [1.0, 0.0])


def test_a_collective_costs_alpha_per_log2_level_plus_beta_per_byte() -> None:
    net = Network(
        "n", dict.fromkeys(OPS, 1e-3), dict.fromkeys(OPS, 1e-9), "", {"allreduce": 2e-5}, {"allreduce": 1e-10}
    )
    assert net.time("allreduce", 1, 0, 10**6) == pytest.approx(2e-5 + 1e-4)  # one rank: the local line
    assert net.time("reduce", 1, 0, 10**6) == 0.0  # no local line for this op
    for group, levels in ((2, 1), (3, 2), (4, 2), (5, 3), (1024, 10)):
        assert net.time("reduce", group, 10**6, 2 * 10**6) == pytest.approx(levels * 1e-3 + 1e-3)
    times = [net.time("broadcast", g, 4096, 4096) for g in range(2, 1025)]
    assert times == sorted(times)


def test_network_calibration_recovers_alpha_and_beta() -> None:
    sizes = [2**12, 2**16, 2**20]
    # At W = 2 the busiest member of each op moves n bytes one way (kfac_dist.comm.accounting).
    truth = {"allreduce": (3e-4, 2e-9), "broadcast": (1e-4, 1e-9), "reduce": (2e-4, 1.5e-9)}
    raw = {op: {n: a + b * n for n in sizes} for op, (a, b) in truth.items()}
    local = {op: {n: a / 10 + b * n / 4 for n in sizes} for op, (a, b) in truth.items()}
    net = network_from(raw, local)
    for op, (a, b) in truth.items():
        assert net.alpha[op] == pytest.approx(a) and net.beta[op] == pytest.approx(b)
        assert net.local_alpha[op] == pytest.approx(a / 10) and net.local_beta[op] == pytest.approx(b / 4)


def test_kernel_calibration_fits_lines_to_the_raw_times() -> None:
    raw = {
        "gemm": [{"flops": f, "seconds": 1e-6 + f / 5e10} for f in (1e5, 1e7, 1e9)],
        "copy": [{"bytes": n, "seconds": 5e-7 + n / 1e10} for n in (1e3, 1e6)],
        "im2col": [{"bytes": n, "seconds": 1e-5 + n / 3e9} for n in (1e4, 1e6)],
        "finite": [{"bytes": n, "seconds": 4e-6 + n / 2e9} for n in (1e3, 1e5, 1e7)],
        "eigh": [{"n": n, "seconds": 2e-5 + 3e-9 * n**3} for n in (16, 64, 256)],
        "compute": {4: {"forward_backward": 0.03, "optimizer": 0.01}, 8: {"forward_backward": 0.07, "optimizer": 0.01}},
    }
    kernels = kernels_from(raw)
    assert kernels.gemm.slope == pytest.approx(1 / 5e10) and kernels.copy.intercept == pytest.approx(5e-7)
    assert kernels.im2col.slope == pytest.approx(1 / 3e9) and kernels.im2col.intercept == pytest.approx(1e-5)
    assert kernels.finite.slope == pytest.approx(1 / 2e9) and kernels.finite.intercept == pytest.approx(4e-6)
    assert kernels.eigh.slope == pytest.approx(3e-9) and kernels.eigh.intercept == pytest.approx(2e-5)
    assert kernels.compute_time(8) == pytest.approx(0.08)  # measured
    assert kernels.compute_time(6) == pytest.approx(0.06)  # between the measurements
    assert kernels.compute_time(16) == pytest.approx(0.16)  # beyond them, on the line through the last two
    assert dataclasses.replace(kernels, compute={4: 0.04, 8: 0.1}).compute_time(1) == 0.0  # floored at 0
    with pytest.raises(ValueError, match="fewer than two"):
        dataclasses.replace(kernels, compute={8: 0.08}).compute_time(6)


def test_library_overheads_are_what_the_kernels_leave_unexplained() -> None:
    tiny = dict(zip(LAYER_PHASES, (1e-4, 2e-5, 3e-5, 4e-5, 5e-5), strict=True))
    local = {"grad_sync": {16: 1e-4 + 16 * 5e-6, 64: 1e-4 + 64 * 5e-6, 256: 1e-4 + 256 * 5e-6}, "tiny": tiny}
    bare = overheads_from(local, NO_KERNELS)  # kernels that cost nothing leave everything to the overheads
    assert bare.layer_overhead == pytest.approx(tiny) and bare.tensor_overhead == pytest.approx(5e-6)
    costly = overheads_from(local, dataclasses.replace(KERNELS, copy=LinearFit(1e-5, 1e-10)))
    assert costly.tensor_overhead == 0.0  # one copy call (10 us) explains more than the 5 us per tensor
    assert costly.layer_overhead["decomposition"] == 0.0  # its eigh and finite-check lines exceed the 30 us
    assert 0.0 < costly.layer_overhead["factor_computation"] < 1e-4


def test_sgd_step_is_compute_plus_one_flat_allreduce(cnn: StepModel) -> None:
    nbytes = 4 * cnn.param_numel  # float32: every rank's chunk is exactly nbytes / 4 at W = 4
    sgd = predict_sgd(cnn, 4, 8, KERNELS, SLOW)
    local = (cnn.param_tensors + 2) * KERNELS.copy.intercept + 4 * nbytes * KERNELS.copy.slope
    ring = 2 * 1e-3 + 1e-8 * 2 * (nbytes - nbytes // 4)  # 2 levels; reduce-scatter + allgather
    assert sgd["compute"] == 0.01
    assert sgd["grad_allreduce"] == pytest.approx(local + ring)
    assert sgd["step"] == pytest.approx(sgd["compute"] + sgd["grad_allreduce"])
    assert predict_sgd(cnn, 1, 6, KERNELS, SLOW)["compute"] == pytest.approx(0.008)  # between 4 and 8


def test_at_one_rank_only_the_local_collective_cost_is_left(cnn: StepModel) -> None:
    slow, fast = (predict_kfac(cnn, 1, 8, KERNELS, net) for net in (SLOW, FAST))
    assert slow == fast  # alpha and beta play no part
    for phases in slow.values():
        assert phases["decomposition_broadcast"] == 0.0 and phases["gradient_broadcast"] == 0.0
    exchanges = ("grad_allreduce", "factor_communication", "decomposition_broadcast", "gradient_broadcast")
    bare = dataclasses.replace(NO_KERNELS, compute={8: 0.01})
    alone = predict_kfac(cnn, 1, 8, bare, SLOW)["inverse"]
    assert all(alone[p] == 0.0 for p in exchanges)  # no local work, free local collectives: nothing
    local = dataclasses.replace(SLOW, local_alpha={"allreduce": 1e-3, "reduce": 2e-3}, local_beta={"reduce": 1e-9})
    with_local = predict_kfac(cnn, 1, 8, bare, local)["inverse"]
    assert with_local["grad_allreduce"] == pytest.approx(1e-3)  # one flat buffer
    assert with_local["factor_communication"] > 2e-3  # one reduce per bucket, plus its bytes
    assert with_local["decomposition_broadcast"] == 0.0 and with_local["gradient_broadcast"] == 0.0


def test_more_ranks_more_time_on_a_slow_network(cnn: StepModel) -> None:
    steps = [predict_kfac(cnn, w, 8, KERNELS, SLOW)["amortised"]["step"] for w in (1, 2, 4, 16, 256)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    sgd = [predict_sgd(cnn, w, 8, KERNELS, SLOW)["step"] for w in (1, 2, 4, 16, 256)]
    assert sgd == sorted(sgd)


@pytest.mark.parametrize(
    ("freq", "weights"),
    [
        ((10, 100), {"factor": 9, "inverse": 1, "plain": 90}),
        ((3, 4), {"factor": 3, "inverse": 1, "inverse_only": 2, "plain": 6}),
    ],
)
def test_amortised_step_is_the_weighted_mean_of_the_kinds(
    cnn: StepModel, freq: tuple[int, int], weights: dict[str, int]
) -> None:
    model = dataclasses.replace(cnn, freq=freq)
    out = predict_kfac(model, 4, 8, KERNELS, SLOW, fraction=0.5)
    assert set(out) == {*weights, "amortised"}
    period = sum(weights.values())
    for phase in (*PHASES, "step"):
        mean = sum(n * out[kind][phase] for kind, n in weights.items()) / period
        assert out["amortised"][phase] == pytest.approx(mean)
    for kind, phases in out.items():
        if kind != "amortised":
            assert phases["step"] == pytest.approx(sum(phases[p] for p in PHASES))
    assert out["plain"]["factor_computation"] == 0.0 and out["plain"]["decomposition"] == 0.0
    assert out["factor"]["factor_communication"] > 0.0 and out["factor"]["decomposition"] == 0.0
    assert out["inverse"]["decomposition"] > 0.0 and out["inverse"]["decomposition_broadcast"] > 0.0


@pytest.mark.parametrize("fraction", ["comm-opt", "mem-opt"])
def test_exchanged_bytes_are_the_planners(cnn: StepModel, fraction: str) -> None:
    """At W = 2 a reduce or broadcast of n bytes moves n bytes through its busiest member and 1.5 n through
    every member (sent + received): the model's per-byte times are 2/3 of the planner's bytes per rank."""
    model = dataclasses.replace(cnn, freq=(1, 1))
    report = plan_model(CNN.build_meta(), 2, KFACOptions(grad_worker_fraction=fraction))
    predicted = predict_kfac(model, 2, 8, NO_KERNELS, PER_BYTE, fraction=FRACTIONS[fraction](2))["inverse"]
    phase_of = {
        "factor_reduce": "factor_communication",
        "decomposition_broadcast": "decomposition_broadcast",
        "gradient_broadcast": "gradient_broadcast",
    }
    moved = 0.0
    for category, phase in phase_of.items():
        planned = [v[category]["sent"] + v[category]["received"] for v in report.step_bytes["inverse"].values()]
        assert planned[0] == planned[1]  # both ranks are in every collective at W = 2
        assert 1.5 * predicted[phase] == planned[0], category
        moved += planned[0]
    assert moved > 0 and predicted["grad_allreduce"] == 4 * cnn.param_numel  # the ring moves n each way


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """``bench scaling`` through its command line, on the tiny settings (a 64-32-10 MLP, 4-step blocks)."""
    out = tmp_path_factory.mktemp("scaling") / "scaling"
    argv = ["--world-sizes", "1", "2", "--block-steps", "4", "--warmup-steps", "1", "--out", str(out)]

    def tiny_settings(args: argparse.Namespace) -> Settings:
        return dataclasses.replace(
            TINY,
            world_sizes=list(args.world_sizes),
            block_steps=args.block_steps,
            warmup_steps=args.warmup_steps,
            rounds=args.rounds or 1,
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scaling, "settings_from_args", tiny_settings)
        assert bench.main(["scaling", *argv]) == 0
    yield json.loads(out.with_suffix(".json").read_text()), out


def test_outputs_are_written(tiny_run: tuple[dict[str, Any], Path]) -> None:
    results, out = tiny_run
    command = "kfac-dist bench scaling --world-sizes 1 2 --block-steps 4 --warmup-steps 1 --out "
    assert results["meta"]["command"].startswith(command)
    assert results["meta"]["settings"]["world_sizes"] == [1, 2]
    text = out.with_suffix(".md").read_text()
    for heading in ("## Measured", "## Phases", "## Calibration", "## Validation", "## Predictions"):
        assert heading in text
    assert "predicted step times within 15%" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_medians_come_from_the_stored_blocks(tiny_run: tuple[dict[str, Any], Path]) -> None:
    results, _ = tiny_run
    launches = results["launches"]
    assert sorted(launch["world_size"] for launch in launches) == [1, 2]
    assert len(results["measured"]) == 2 * 4
    for row in results["measured"]:
        mine = [launch for launch in launches if launch["world_size"] == row["world_size"]]
        name = f"{row['mode']}/{row['optimizer']}"
        blocks = [launch["ranks"][0]["blocks"][name] for launch in mine]
        assert all(block["steps"] == 4 == math.lcm(*TINY.freq) for block in blocks)  # whole periods
        assert row["step_s"] == [block["wall"] / block["steps"] for block in blocks]
        assert row["median_s"] == statistics.median(row["step_s"])
        assert row["global_batch"] == row["batch"] * row["world_size"]
        assert row["batch"] == (8 if row["mode"] == "weak" else 8 // row["world_size"])
        phases = row["phases"]  # round 1 is profiled
        assert set(phases) == {*PHASES, "unattributed", "step"}
        if row["optimizer"] == "sgd":
            assert all(phases[p] == 0.0 for p in KFAC_PHASES)
        else:
            assert phases["decomposition"] > 0.0 and phases["factor_computation"] > 0.0


def test_validation_compares_the_model_with_the_medians(tiny_run: tuple[dict[str, Any], Path]) -> None:
    results, _ = tiny_run
    measured = {(r["world_size"], r["mode"], r["optimizer"]): r for r in results["measured"]}
    assert len(results["validation"]) == len(measured)
    for v in results["validation"]:
        row = measured[(v["world_size"], v["mode"], v["optimizer"])]
        assert v["median_s"] == row["median_s"]
        assert v["error"] == pytest.approx(v["predicted_s"] / v["median_s"] - 1.0)
        assert v["predicted_s"] == v["predicted_phases"]["step"]
        phases = {p: s for p, s in v["predicted_phases"].items() if p != "step"}
        assert set(phases) == (set(PHASES) if v["optimizer"] == "kfac" else {"compute", "grad_allreduce"})
        assert v["predicted_s"] == pytest.approx(sum(phases.values()))
        assert v["validation_point"] == (v["world_size"] <= 2)


def test_predictions_cover_every_world_size_and_follow_from_the_calibration(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    results, _ = tiny_run
    calibration = results["calibration"]
    fits = calibration["kernels"]
    kernels = Kernels(
        gemm=LinearFit(**fits["gemm"]),
        copy=LinearFit(**fits["copy"]),
        im2col=LinearFit(**fits["im2col"]),
        finite=LinearFit(**fits["finite"]),
        eigh=LinearFit(**fits["eigh"]),
        compute={int(b): s for b, s in calibration["compute_s"].items()},
        layer_overhead=calibration["layer_overhead_s"],
        tensor_overhead=calibration["tensor_overhead_s"],
    )
    networks = {n["name"]: Network(**n) for n in calibration["networks"]}
    assert list(networks) == ["gloo loopback (calibrated)", scaling.IB_NETWORK.name]
    model = step_model(TINY.proxy, TINY.freq)
    rows = results["predictions"]
    for name in networks:
        for mode in ("weak", "strong"):
            mine = [r for r in rows if (r["network"], r["mode"]) == (name, mode)]
            assert [r["world_size"] for r in mine] == [1, 2, 4, 8]
            for r in mine:
                assert r["batch"] == (8 if mode == "weak" else 16 // r["world_size"])
                sgd = predict_sgd(model, r["world_size"], r["batch"], kernels, networks[name])
                assert r["sgd_s"] == pytest.approx(sgd["step"])
                assert set(r["kfac"]) == set(FRACTIONS)
                for fraction, k in r["kfac"].items():
                    f = FRACTIONS[fraction](r["world_size"])
                    kfac = predict_kfac(model, r["world_size"], r["batch"], kernels, networks[name], fraction=f)
                    assert k["step_s"] == pytest.approx(kfac["amortised"]["step"])
            assert len({k["step_s"] for k in mine[0]["kfac"].values()}) == 1  # at W = 1 every fraction is one


def test_the_report_marks_oversubscribed_runs_as_unvalidated() -> None:
    row = {"world_size": 4, "mode": "weak", "optimizer": "kfac", "batch": 8, "median_s": 0.2, "predicted_s": 0.1}
    measured = [{"world_size": w, "mode": "weak", "optimizer": "kfac", "min_busy": b} for w, b in ((4, 0.5), (2, 1))]
    lines = scaling_report.validation_table([row | {"error": -0.5, "validation_point": False}], measured)
    assert lines[-1].endswith("| 0.50 | not validated: oversubscribed |")
    lines = scaling_report.validation_table([row | {"world_size": 2, "error": 0.1, "validation_point": True}], measured)
    assert lines[-1].endswith("| +10.0% | 1.00 | pass |")
    measured[1]["min_busy"] = 0.5
    lines = scaling_report.validation_table(
        [row | {"world_size": 2, "error": -0.5, "validation_point": True}], measured
    )
    assert lines[-1].endswith("| **fail** (contended) |")
    assert scaling_report.efficiency(64, 0.5, 4, 16, 0.5) == 1.0  # weak scaling, step time unchanged


def test_a_run_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(GlooRunError, match="collective_worker failed"):
        run_gloo(collective_worker, 2, [2**26], 50, timeout=2.0)
    assert time.monotonic() - started < 30


def test_only_convolutions_wider_than_1x1_are_priced_with_an_unfold() -> None:
    model = step_model(PROXY, (10, 100))  # ResNet-50 at width 1/8
    unfolded = sorted(layer.shape.name for layer in model.layers if layer.unfold)
    assert len(model.layers) == 54
    assert unfolded == sorted(
        ["conv1", *(f"layer{s}.{b}.conv2" for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n))]
    )
