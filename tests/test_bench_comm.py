"""The communication benchmark: planner numbers against hand-counted formulas, and the real-run check.

The hand counts are independent of the planner: an allreduce of n bytes over W ranks moves 2 (W - 1) / W n
each way per rank (ring reduce-scatter + allgather), KAISA keeps every factor on every rank, and the factor
sizes come from the layer shapes (a^2 + g^2 entries per block, or a (a + 1) / 2 + g (g + 1) / 2 as triangles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kfac_dist.app import bench
from kfac_dist.app.bench import comm
from kfac_dist.app.bench.common import ModelSpec
from kfac_dist.app.bench.gloo_runs import check_against_planner, step_kind
from kfac_dist.app.models import build_model
from kfac_dist.planner import layer_shapes, plan_model

FLOAT32 = 4
TINY_PROXY = ModelSpec("small_cnn", {"num_classes": 10}, (1, 28, 28))


def _factor_bytes(model: str, triangles: bool) -> int:
    with torch.device("meta"):
        shapes = layer_shapes(build_model(model))

    def entries(side: int) -> int:
        return side * (side + 1) // 2 if triangles else side * side

    return sum(FLOAT32 * s.blocks * (entries(s.a_side) + entries(s.g_side)) for s in shapes)


@pytest.fixture(scope="module")
def resnet50_w8() -> list[dict[str, Any]]:
    return comm.planner_sweep(comm.PLANNED.build_meta(), [8], log=lambda line: None)


def test_kaisa_factor_traffic_is_a_full_allreduce_of_every_factor(resnet50_w8: list[dict[str, Any]]) -> None:
    world_size = 8
    for row in resnet50_w8:
        for scheme, triangles in (("kaisa", False), ("kaisa_packed", True)):
            total = _factor_bytes("resnet50", triangles)
            factor = row["schemes"][scheme]["bytes"]["factor"]["by_category"]["factor_reduce"]
            # sent + received = 4 (W - 1) / W n, up to the one-byte chunk remainders of each fusion bucket
            assert factor["mean"] == pytest.approx(4 * (world_size - 1) / world_size * total, abs=64)
            memory = row["schemes"][scheme]["memory"]["by_category_max"]
            assert memory["factors"] == _factor_bytes("resnet50", False)  # every rank holds every factor


def test_ours_moves_and_holds_less_than_kaisa(resnet50_w8: list[dict[str, Any]]) -> None:
    assert [row["fraction"] for row in resnet50_w8] == list(comm.FRACTIONS)
    assert [row["grad_workers"] for row in resnet50_w8] == [1, 4, 8]
    for row in resnet50_w8:
        ours, kaisa, packed = (row["schemes"][s] for s in ("ours", "kaisa", "kaisa_packed"))
        ours_factors = ours["bytes"]["factor"]["by_category"]["factor_reduce"]["max"]
        packed_factors = packed["bytes"]["factor"]["by_category"]["factor_reduce"]["max"]
        # reducing into the owner moves about half of an allreduce of the same triangles
        assert 0.45 < ours_factors / packed_factors < 0.6
        assert ours["memory"]["max"] < packed["memory"]["max"] < kaisa["memory"]["max"]
        # the gradient broadcast does not depend on the factor scheme
        grads = {s["bytes"]["amortised"]["by_category"]["gradient_broadcast"]["max"] for s in (ours, kaisa, packed)}
        assert len(grads) == 1
    # comm-opt (g = W) broadcasts no gradients; mem-opt holds the fewest decompositions
    by_fraction = {row["fraction"]: row["schemes"]["ours"] for row in resnet50_w8}
    assert by_fraction["comm-opt"]["bytes"]["plain"]["max"] == 0
    decompositions = [by_fraction[f]["memory"]["by_category_max"]["decompositions"] for f in comm.FRACTIONS]
    assert decompositions == sorted(decompositions) and decompositions[0] < decompositions[-1]


def test_step_kinds_follow_the_schedule() -> None:
    kinds = [step_kind(step, (10, 100)) for step in range(100)]
    assert kinds[0] == "inverse"
    assert kinds.count("factor") == 9 and kinds.count("inverse") == 1 and kinds.count("plain") == 90


def test_real_runs_equal_the_planner_and_a_changed_byte_is_caught() -> None:
    rows = comm.real_check([2], steps=11, batch=2, proxy=TINY_PROXY, log=lambda line: None)
    assert {(r["fraction"], r["scheme"]) for r in rows} == {
        (f, s) for f in ("mem-opt", "comm-opt") for s in comm.SCHEMES
    }  # hybrid-opt gives g = 1 at W = 2, the same as mem-opt: run once
    for row in rows:
        assert row["equal"], row["mismatches"]
        assert row["steps"] == 11 and row["kinds"] == ["factor", "inverse", "plain"]
        assert row["compared"] > 11 * 2 * 6

    # the comparison itself: planner-made records pass, one byte more on one rank fails, named
    report = plan_model(TINY_PROXY.build_meta(), 2, comm.options("comm-opt", "ours"))
    fake = [
        {"plan": report.plan.to_dict(), "memory": dict(report.memory[rank]), "steps": _planned_steps(report, rank)}
        for rank in range(2)
    ]
    assert check_against_planner(fake, report)["equal"]
    fake[1]["steps"][3]["factor_reduce"]["sent"] += 1
    check = check_against_planner(fake, report)
    assert not check["equal"]
    planned = report.step_bytes[step_kind(3, comm.FREQ)][1]["factor_reduce"]["sent"]  # a plain step: 0
    assert check["mismatches"] == [f"rank 1 step 3 factor_reduce sent: recorded {planned + 1}, planner {planned}"]


def _planned_steps(report: Any, rank: int, steps: int = 11) -> list[dict[str, dict[str, int]]]:
    return [
        {c: dict(v) for c, v in report.step_bytes[step_kind(step, comm.FREQ)][rank].items()} for step in range(steps)
    ]


def test_command_line_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "comm"
    code = bench.main(
        ["comm", "--world-sizes", "8", "--check-world-sizes", "2", "--check-steps", "2", "--out", str(out)]
    )
    assert code == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert [row["world_size"] for row in results["planner"]] == [8, 8, 8]
    assert all(case["equal"] for case in results["check"]["cases"])
    assert results["meta"]["command"].startswith("kfac-dist bench comm --world-sizes 8")
    text = out.with_suffix(".md").read_text()
    assert "KAISA" in text and "equal the planner exactly" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
