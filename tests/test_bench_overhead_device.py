"""The overhead benchmark's device protocol (``--device cuda``), run on the CPU with its wall clock and a tiny ResNet.

No GPU here: the protocol's code runs on the CPU (the CUDA clock is the only part that does not), with bf16 as CPU
autocast. No timing thresholds: only consistency (arms on the same start, medians and ratios recomputed from the
stored blocks, phases adding up to the profiled step), the KAISA arms when kfac-pytorch's ``kfac`` package is
importable (from ../shared/anchors/kfac-pytorch-0.4.2 beside this checkout), and the command line's one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kfac_dist.app import bench
from kfac_dist.app.bench import overhead_device_report, overhead_report
from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.bench.overhead import operator_counts
from kfac_dist.app.bench.overhead_clock import WallClock, clock_for
from kfac_dist.app.bench.overhead_device import DeviceSettings, build_arms, run_device
from kfac_dist.app.bench.overhead_kaisa import KaisaUnavailable, require_kaisa
from kfac_dist.app.bench.overhead_runs import PHASES, TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
#: Where KAISA's package for the side-by-side arm may be (never part of the project): $KFAC_DIST_KAISA_DIR, or the
#: anchor copy beside the checkout (../shared/anchors), or this workplace's shared folder.
KAISA_DIRS = [
    Path(path)
    for path in (
        os.environ.get("KFAC_DIST_KAISA_DIR", ""),
        str(ROOT.parent / "shared" / "anchors" / "kfac-pytorch-0.4.2"),
        "/work/shared/anchors/kfac-pytorch-0.4.2",
    )
    if path
]
TINY = ModelSpec("resnet18", {"width_multiplier": 1 / 16, "num_classes": 10}, (3, 16, 16))
FREQ = (2, 4)


def tiny_settings(**changes: Any) -> DeviceSettings:
    settings = DeviceSettings(
        device="cpu", model=TINY, count_model=TINY, batch_sizes=[4], methods=["eigen", "inverse"], freqs=[FREQ]
    )
    return dataclasses.replace(settings, rounds=2, min_block_steps=4, warmup_steps=2, batch_pool=2, **changes)


@pytest.fixture(scope="module")
def device_results() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = tiny_settings()
        results = run_device(settings, log=lambda line: None)
        results["operators"] = operator_counts({"tiny ResNet-18": TINY}, settings.methods, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.fixture
def kaisa(monkeypatch: pytest.MonkeyPatch) -> None:
    """KAISA's ``kfac`` importable: installed, or from the anchor copy beside this checkout; else skip."""
    if importlib.util.find_spec("kfac") is None:
        found = next((d for d in KAISA_DIRS if (d / "kfac").is_dir()), None)
        if found is None:
            pytest.skip(f"KAISA's kfac package is neither installed nor in {', '.join(map(str, KAISA_DIRS))}")
        monkeypatch.syspath_prepend(str(found))


def test_the_wall_clock_times_what_lies_between_start_and_stop() -> None:
    clock = clock_for(torch.device("cpu"))
    assert isinstance(clock, WallClock)
    with pytest.raises(RuntimeError, match="before start"):
        clock.stop()
    clock.start()
    torch.randn(64, 64) @ torch.randn(64, 64)
    clock.sync()
    first = clock.stop()
    assert 0 < first <= clock.stop() < 60  # the interval only grows until the next start


def test_every_arm_starts_from_the_same_weights_and_batches() -> None:
    assert all(arm.dtype is torch.bfloat16 for arm in build_arms(tiny_settings(), 4, "bf16", FREQ))
    arms = build_arms(tiny_settings(), 4, "fp32", FREQ)
    assert [a.name for a in arms] == ["SGD", "kfac-dist eigen", "kfac-dist inverse"]
    reference = arms[0].arm.model.state_dict()
    for arm in arms:
        assert arm.arm.batches is arms[0].arm.batches and arm.dtype is None
        assert all(torch.equal(value, reference[key]) for key, value in arm.arm.model.state_dict().items())
    assert arms[1].arm.pre is not None and arms[0].arm.pre is None
    block = arms[1].run(3, WallClock(), regions=True)
    assert arms[1].arm.position == 3 and block.steps == 3 and arms[1].arm.pre.steps == 3
    assert block.regions["forward"] > 0 and block.regions["kfac_step"] > 0 and math.isfinite(arms[1].arm.last_loss)


def test_every_configuration_and_arm_is_measured(device_results: dict[str, Any]) -> None:
    assert device_results["protocol"] == "device" and device_results["device"] == "cpu"
    entries = device_results["results"]
    assert [(e["batch"], e["dtype"], e["freq"]) for e in entries] == [(4, "fp32", [2, 4]), (4, "bf16", [2, 4])]
    for entry in entries:
        assert entry["block_steps"] == 4 and entry["kaisa_over_kfac_dist"] == {}
        assert list(entry["arms"]) == ["SGD", "kfac-dist eigen", "kfac-dist inverse"]
        sgd = entry["arms"]["SGD"]
        for arm in entry["arms"].values():
            assert len(arm["step_ms"]) == 2 and all(math.isfinite(ms) and ms > 0 for ms in arm["step_ms"])
            assert arm["median_ms"] == statistics.median(arm["step_ms"])
            assert arm["ratio"] == pytest.approx(arm["median_ms"] / sgd["median_ms"])
            assert arm["ratio_per_round"] == pytest.approx(
                [a / s for a, s in zip(arm["step_ms"], sgd["step_ms"], strict=True)]
            )
            assert set(arm["coarse_ms"]) == {"forward", "backward", "kfac_step", "optimizer"}
        assert "profiled" not in sgd and sgd["coarse_ms"]["kfac_step"] < sgd["coarse_ms"]["forward"]


def test_kfac_dist_phases_add_up_to_the_profiled_step(device_results: dict[str, Any]) -> None:
    for entry in device_results["results"]:
        for name in ("kfac-dist eigen", "kfac-dist inverse"):
            prof = entry["arms"][name]["profiled"]
            assert set(prof["phases_ms"]) == set(PHASES)
            assert sum(prof["phases_ms"].values()) == pytest.approx(prof["step_ms"])
            assert abs(prof["named_sum_ms"] - prof["step_ms"]) <= TOLERANCE * prof["step_ms"], (name, prof)
            assert prof["phases_ms"]["decomposition"] > 0 and prof["phases_ms"]["factor_computation"] > 0
            assert prof["step_ms"] == pytest.approx(entry["arms"][name]["profiled_step_ms"])


def test_the_report_of_a_device_run(device_results: dict[str, Any], tmp_path: Path) -> None:
    results = json.loads(json.dumps(device_results))  # what the JSON file holds
    counts = results["operators"][0]
    assert counts["model"] == "tiny ResNet-18" and counts["counted"] == TINY.describe()
    assert set(counts["methods"]) == {"eigen", "inverse"} and counts["sgd_forward_backward"] > 0
    text = overhead_report.markdown(results)
    assert text.startswith("# Overhead on cpu:") and "| 4 | bf16 | (2, 4) | kfac-dist inverse |" in text
    assert "periods timed by the wall clock;" in text and "CUDA events" not in text
    assert "## Phases of kfac-dist" in text and "| 4 | fp32 | (2, 4) | eigen |" in text
    assert "## ATen operators per kind of step" in text and "| eigen | plain |" in text
    assert "target" not in text  # no configuration of the targets (batch 32 / 128 at (10, 100)) was run
    entry = results["results"][0]
    entry |= {"batch": 32, "freq": [10, 100], "kaisa_over_kfac_dist": {"eigen": 1.7}}
    entry["arms"]["KAISA eigen"] = {"kind": "kaisa", "method": "eigen", "failed": "LinAlgError: eigh failed"}
    lines = overhead_device_report.headline(results)
    eigen, inverse = entry["arms"]["kfac-dist eigen"]["ratio"], entry["arms"]["kfac-dist inverse"]["ratio"]
    assert len(lines) == 2 and f"**{eigen:.2f}x** ({'meets' if eigen <= 1.5 else 'misses'} the 1.5x" in lines[0]
    assert "KAISA / kfac-dist **1.70x** (meets the 1.6x target)" in lines[0]
    assert f"**{inverse:.2f}x** ({'meets' if inverse <= 1.3 else 'misses'} the 1.3x" in lines[1]
    assert "| 32 | fp32 | (10, 100) | KAISA eigen | failed: LinAlgError: eigh failed |" in overhead_report.markdown(
        results
    )
    pytest.importorskip("matplotlib", reason="the PNG needs requirements/bench.txt")
    assert overhead_report.plot(results, tmp_path / "dev").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_projects_the_ratio_with_decompositions_spread_over_ranks(device_results: dict[str, Any]) -> None:
    entry = device_results["results"][0]
    sgd, arm = entry["arms"]["SGD"]["median_ms"], entry["arms"]["kfac-dist eigen"]
    decomposition = arm["profiled"]["phases_ms"]["decomposition"]
    assert decomposition > 0  # decompositions every 4 steps
    table = "\n".join(overhead_device_report.spread_table(device_results))
    projected = [arm["ratio"] - (1 - 1 / w) * decomposition / sgd for w in overhead_device_report.SPREAD_WORLDS]
    assert projected[0] < arm["ratio"] and projected[1] < projected[0]
    row = f"| {entry['batch']} | {entry['dtype']} | (2, 4) | eigen | {arm['ratio']:.2f}x |"
    assert row in table and f"| {projected[0]:.2f}x | {projected[1]:.2f}x |" in table
    assert "decompositions spread over ranks" in overhead_report.markdown(device_results)


@pytest.mark.outside_project
def test_kaisa_arms_run_beside_on_the_same_start(kaisa: None) -> None:
    settings = tiny_settings(compare_kaisa=True, dtypes=["fp32"])
    arms = build_arms(settings, 4, "fp32", FREQ)
    assert [a.name for a in arms[3:]] == ["KAISA eigen", "KAISA inverse"]
    for arm in arms[3:]:
        assert arm.kaisa is not None and arm.arm.pre is None
        assert arm.kaisa.damping == 1e-3 and arm.kaisa.factor_update_steps == 2 and arm.kaisa.inv_update_steps == 4
        before = copy.deepcopy(arm.arm.model.state_dict())
        arm.run(4, WallClock())
        assert arm.kaisa.steps == 4 and not torch.equal(before["fc.weight"], arm.arm.model.state_dict()["fc.weight"])
    results = run_device(settings, log=lambda line: None)
    entry = results["results"][0]
    for method in ("eigen", "inverse"):
        arm = entry["arms"][f"KAISA {method}"]
        assert "failed" not in arm, arm
        assert arm["kind"] == "kaisa" and all(math.isfinite(ms) and ms > 0 for ms in arm["step_ms"])
        assert entry["kaisa_over_kfac_dist"][method] == pytest.approx(
            arm["median_ms"] / entry["arms"][f"kfac-dist {method}"]["median_ms"]
        )
    assert "| 4 | fp32 | (2, 4) | KAISA eigen |" in overhead_report.markdown(results)


def hide_kaisa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import kfac`` (and its modules, even if an earlier test imported them) raise ImportError."""
    for name in ("kfac", "kfac.preconditioner", "kfac.enums"):
        monkeypatch.setitem(sys.modules, name, None)


def test_kaisa_that_does_not_import_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_kaisa(monkeypatch)
    with pytest.raises(KaisaUnavailable, match=r"--compare-kaisa: cannot import KAISA .*PYTHONPATH=<dir containing"):
        require_kaisa()


@pytest.mark.parametrize(
    ("argv", "cuda", "message"),
    [
        (["--device", "cuda"], False, "--device cuda: torch.cuda.is_available() is False"),
        (["--device", "cuda", "--models", "mlp"], True, "--models: only with --device cpu"),
        (["--device", "cuda", "--compare-kaisa"], True, "--compare-kaisa: cannot import KAISA"),
        (["--compare-kaisa", "--dtype", "bf16"], False, "--dtype, --compare-kaisa: only with --device cuda"),
        (["--precisions", "tf32"], False, "--precisions: only with --device cuda"),
    ],
)
def test_command_line_errors_name_the_option(
    argv: list[str], cuda: bool, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the checks run before anything touches CUDA
    hide_kaisa(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["overhead", *argv, "--out", str(tmp_path / "o"), "--no-plot"])
    text = str(exit_info.value.code)
    assert text.startswith("kfac-dist bench overhead: error: ") and message in text and "\n" not in text
    assert not list(tmp_path.iterdir())


def test_precision_arms_run_beside_the_exact_one_and_are_labelled() -> None:
    settings = dataclasses.replace(
        tiny_settings(), methods=["eigen"], precisions=["highest", "bf16"], dtypes=["fp32"], rounds=1
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_device(settings, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    arms = results["results"][0]["arms"]
    assert list(arms) == ["SGD", "kfac-dist eigen", "kfac-dist eigen bf16"]
    assert arms["kfac-dist eigen"]["precision"] == "highest" and arms["kfac-dist eigen bf16"]["precision"] == "bf16"
    assert all(math.isfinite(ms) for arm in arms.values() for ms in arm["step_ms"])
    text = "\n".join(overhead_device_report.phases_table(results))
    assert "| eigen |" in text and "| eigen bf16 |" in text
