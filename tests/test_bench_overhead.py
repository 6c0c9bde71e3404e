"""The overhead benchmark on tiny configurations (seconds): outputs exist and the phases add up.

No timing thresholds: only consistency (block lengths are whole inverse periods, medians and ratios recomputed
from the stored blocks, phases within 10% of the measured K-FAC step, arms interleaved on the same start).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from kfac_dist.app import bench
from kfac_dist.app.bench import overhead_flops, overhead_report
from kfac_dist.app.bench.arms import Arm
from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.bench.overhead import Settings, run_benchmark
from kfac_dist.app.bench.overhead_runs import PHASES, TOLERANCE, Workload, block_steps
from kfac_dist.options import KFACOptions

TINY_MLP = Workload(
    "tiny MLP", ModelSpec("mlp", {"in_features": 64, "hidden": (32,), "num_classes": 10}, (1, 8, 8)), 16
)
TINY_CNN = Workload("tiny CNN", ModelSpec("small_cnn", {"num_classes": 10}, (1, 28, 28)), 8)
FREQS = [(1, 1), (2, 4)]


@pytest.fixture(scope="module")
def tiny_results() -> dict[str, Any]:
    settings = Settings(
        models=[TINY_MLP, TINY_CNN],
        freqs=FREQS,
        methods=["eigen", "inverse"],
        rounds={(1, 1): 2, (2, 4): 1},
        min_block_steps=4,
        warmup_steps=3,
    )
    return run_benchmark(settings, log=lambda line: None)


def test_every_configuration_is_measured(tiny_results: dict[str, Any]) -> None:
    entries = tiny_results["results"]
    assert [(e["model"], tuple(e["freq"])) for e in entries] == [
        (m.title, f) for m in (TINY_MLP, TINY_CNN) for f in FREQS
    ]
    for entry in entries:
        rounds = entry["rounds"]
        assert rounds == (2 if entry["freq"] == [1, 1] else 1)
        assert entry["block_steps"] % entry["freq"][1] == 0 and entry["block_steps"] >= 4
        assert len(entry["sgd"]["step_ms"]) == rounds
        assert entry["sgd"]["median_ms"] == statistics.median(entry["sgd"]["step_ms"])
        assert set(entry["methods"]) == {"eigen", "inverse"}
        for m in entry["methods"].values():
            assert len(m["step_ms"]) == rounds
            assert m["median_ms"] == statistics.median(m["step_ms"])
            assert m["ratio"] == pytest.approx(m["median_ms"] / entry["sgd"]["median_ms"])
            ratios = [k / s for k, s in zip(m["step_ms"], entry["sgd"]["step_ms"], strict=True)]
            assert m["ratio_per_round"] == pytest.approx(ratios)
            assert m["health"]["decomposition_unavailable"] == 0


def test_phases_add_up_to_the_measured_step(tiny_results: dict[str, Any]) -> None:
    for entry in tiny_results["results"]:
        for m in entry["methods"].values():
            prof = m["profiled"]
            assert set(prof["phases_ms"]) == set(PHASES)
            named = prof["named_sum_ms"]
            assert abs(named - prof["step_ms"]) <= TOLERANCE * prof["step_ms"], (entry["model"], entry["freq"], prof)
            assert prof["within_tolerance"]
            # "other" absorbs the remainder, so the bars add up to the measured step exactly.
            assert sum(prof["phases_ms"].values()) == pytest.approx(prof["step_ms"])
            assert prof["phases_ms"]["factor_computation"] > 0 and prof["phases_ms"]["decomposition"] > 0
            assert prof["phases_ms"]["forward"] > 0 and prof["phases_ms"]["backward"] > 0
            lib = prof["library_phases_ms"]
            assert prof["phases_ms"]["preconditioning"] == pytest.approx(lib["preconditioning"] + lib["kl_clip"])
        assert sum(entry["sgd_phases_ms"].values()) == pytest.approx(entry["sgd"]["median_ms"])


def test_block_is_whole_inverse_periods() -> None:
    assert block_steps((1, 1), 20) == 20
    assert block_steps((10, 100), 20) == 100
    assert block_steps((50, 500), 20) == 500
    assert block_steps((2, 3), 7) == 9


def test_arms_share_initial_weights_and_blocks_start_on_inverse_steps() -> None:
    model = TINY_MLP.model.build(0)
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    sgd = Arm("sgd", model, batches, None)
    kfac = Arm("eigen", TINY_MLP.model.build(1), batches, KFACOptions(factor_update_steps=2, inv_update_steps=4))
    kfac.model.load_state_dict(model.state_dict())
    for arm in (sgd, kfac):
        arm.run(3)
        arm.rebuild(profile=False, align=True)
    assert kfac.pre is not None and kfac.pre.steps == 4
    kfac.rebuild(profile=True, align=True)
    times = kfac.run(4)
    assert kfac.pre.steps == 8 and kfac.position == sgd.position + 4
    assert times.library["decomposition"] > 0  # the block started on an inverse step


def test_command_line_outputs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the PNG needs requirements/bench.txt")
    out = tmp_path / "overhead"
    argv = ["--models", "mlp", "--freqs", "1,1", "2,4", "--methods", "inverse", "--rounds", "1"]
    argv += ["--min-block-steps", "2", "--warmup-steps", "1", "--out", str(out)]
    assert bench.main(["overhead", *argv]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["meta"]["threads"] == 1
    assert results["meta"]["command"].startswith("kfac-dist bench overhead --models mlp --freqs 1,1 2,4")
    assert [r["freq"] for r in results["results"]] == [[1, 1], [2, 4]]
    counts = results["operators"]
    assert [c["model"] for c in counts] == ["MLP 784-128-64-10 (batch 64)"] and set(counts[0]["methods"]) == {"inverse"}
    kinds = counts[0]["methods"]["inverse"]
    assert kinds["plain"]["hooks"] == 0 < kinds["factor"]["hooks"] and kinds["inverse"]["step"] > kinds["plain"]["step"]
    text = out.with_suffix(".md").read_text()
    assert "| MLP 784-128-64-10 (batch 64) | (1, 1) | SGD |" in text and "## FLOP model" in text
    assert "## ATen operators per kind of step" in text and "| inverse | factor |" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_model_of_the_proxy_matches_resnet50_without_the_stem() -> None:
    rows = {r["config"]: r for r in overhead_flops.ratio_table([(10, 100)])}
    full = rows["ResNet-50 without the stem conv"]
    proxy = rows["proxy without the stem conv"]
    for kind, key in (("per_factor_step", "factors"), ("per_inverse_step", "eigh"), ("per_step", "eigen")):
        assert proxy[kind][key] == pytest.approx(full[kind][key], rel=0.05)
    # ResNet-50 at batch 32: 3 x 4.1 GMAC x 2 FLOP x 32 images of forward + backward (the stem's input needs none).
    assert rows["ResNet-50, 224x224, batch 32, 1000 classes"]["forward_backward_gflop"] == pytest.approx(
        777.6, rel=1e-3
    )
    assert overhead_report.flop_table(list(rows.values()))[0].startswith("| configuration |")
