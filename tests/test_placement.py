"""Tests of kfac_dist.placement: owners, grad-worker windows, gradient broadcasts, balance, plan as data."""

from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import pytest

from kfac_dist import placement
from kfac_dist.placement import (
    LayerPlan,
    LayerShape,
    Plan,
    build_plan,
    compute_cost,
    grad_broadcasts,
    grad_worker_window,
    memory_cost,
)

FRACTIONS: list[float | str] = ["mem-opt", 0.25, "hybrid-opt", 0.75, "comm-opt"]


def shape(name: str, a: int, g: int, blocks: int = 1) -> LayerShape:
    return LayerShape(name, a, g, grad_numel=a * g * blocks, blocks=blocks)


def resnet50() -> list[LayerShape]:
    """ResNet-50 (He et al. 2016, torchvision layout): convs have no bias, A side = c_in * k * k."""
    layers = [shape("conv1", 3 * 7 * 7, 64)]
    c_in = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            layers += [shape(p + ".conv1", c_in, width), shape(p + ".conv2", 9 * width, width)]
            layers.append(shape(p + ".conv3", width, 4 * width))
            if b == 0:
                layers.append(shape(p + ".downsample.0", c_in, 4 * width))
            c_in = 4 * width
    layers.append(shape("fc", 2048 + 1, 1000))
    return layers


def equal_layers(n: int) -> list[LayerShape]:
    return [shape(f"l{i:03d}", 32, 16) for i in range(n)]


def loads(plan: Plan, layers: list[LayerShape]) -> tuple[list[int], list[int]]:
    """Per rank: compute of owned layers; memory = factors of owned + decompositions of worked layers."""
    by_name = {s.name: s for s in layers}
    comp, mem = [0] * plan.world_size, [0] * plan.world_size
    for lp in plan.layers:
        comp[lp.owner] += compute_cost(by_name[lp.name])
        mem[lp.owner] += memory_cost(by_name[lp.name])
        for r in lp.grad_workers:
            mem[r] += memory_cost(by_name[lp.name])
    return comp, mem


def test_resnet50_shapes_are_the_real_architecture() -> None:
    layers = resnet50()
    assert len(layers) == 54  # 53 convolutions + fc
    # 25,557,032 parameters in ResNet-50, of which 53,120 are batch-norm weights and biases
    assert sum(s.grad_numel for s in layers) == 25_557_032 - 53_120


@pytest.mark.parametrize("assignment", ["compute", "memory"])
@pytest.mark.parametrize("world_size", [2, 4, 5, 8, 64])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_resnet50_balance(world_size: int, fraction: float | str, assignment: str) -> None:
    # Any placement has max load >= LB = max(total / W, largest single layer); memory counts the owner's
    # factors and the decompositions on all g workers. Graham's LPT guarantee is 4/3 of the optimum for one
    # resource; we ask for 4/3 of LB (stricter: LB <= optimum) for BOTH compute and memory. Measured:
    # compute <= 1.09 LB, memory <= 1.30 LB (W=64, g=16: 4 windows of 16 ranks share three 4608-wide convs, so
    # every owner choice over those windows gives memory >= 1.27 LB: LB is weak there, the plan is within 3%).
    # Plain LPT on compute alone fails the memory bound at W=4 (1.44 LB).
    layers = resnet50()
    plan = build_plan(layers, world_size, fraction, assignment)
    comp, mem = loads(plan, layers)
    c, m = [compute_cost(s) for s in layers], [memory_cost(s) for s in layers]
    g = plan.grad_workers
    assert max(comp) <= 4 / 3 * max(sum(c) / world_size, max(c))
    assert max(mem) <= 4 / 3 * max((g + 1) * sum(m) / world_size, 2 * max(m))


@pytest.mark.parametrize("world_size", [8, 64])
def test_resnet50_largest_layers_alone(world_size: int) -> None:
    # When W exceeds the number of dominant layers, the eigh time is exactly that of the largest layer.
    layers = resnet50()
    comp, _ = loads(build_plan(layers, world_size, "hybrid-opt"), layers)
    assert max(comp) == max(compute_cost(s) for s in layers)


def test_largest_layers_spread_over_windows() -> None:
    # W=64, g=8: the three 4608-wide convs must land in three different grad-worker windows.
    layers = resnet50()
    plan = build_plan(layers, 64, 0.125)
    big = [lp for lp in plan.layers if lp.name.endswith("conv2") and lp.name.startswith("layer4")]
    assert len({lp.grad_workers for lp in big}) == 3


@pytest.mark.parametrize("world_size,fraction", [(3, "hybrid-opt"), (5, 0.4), (4, 0.75), (6, 4 / 6), (7, 3 / 7)])
def test_equal_layers_equal_loads_when_g_does_not_divide_w(world_size: int, fraction: float) -> None:
    plan = build_plan(equal_layers(world_size * 6), world_size, fraction)
    g = plan.grad_workers
    assert world_size % g != 0
    assert [len(plan.layers_owned_by(r)) for r in range(world_size)] == [6] * world_size
    assert [len(plan.layers_worked_by(r)) for r in range(world_size)] == [6 * g] * world_size


@pytest.mark.parametrize("world_size", range(1, 13))
@pytest.mark.parametrize("fraction", FRACTIONS + [0.4, 0.6])
def test_workers_and_broadcasts(world_size: int, fraction: float | str) -> None:
    plan = build_plan(equal_layers(2 * world_size + 1), world_size, fraction)
    g = plan.grad_workers
    assert 1 <= g <= world_size
    for lp in plan.layers:
        assert len(lp.grad_workers) == len(set(lp.grad_workers)) == g
        assert lp.owner in lp.grad_workers
        assert list(lp.grad_workers) == sorted(lp.grad_workers)
        received = [r for _, receivers in lp.grad_broadcasts for r in receivers]
        non_workers = sorted(set(range(world_size)) - set(lp.grad_workers))
        assert sorted(received) == non_workers  # every non-worker exactly once
        sources = [src for src, _ in lp.grad_broadcasts]
        assert set(sources) <= set(lp.grad_workers) and len(set(sources)) == len(sources)
        assert len(sources) == min(g, world_size - g)  # spread over as many workers as there is use for
        counts = [len(receivers) for _, receivers in lp.grad_broadcasts]
        assert not counts or max(counts) - min(counts) <= 1
        if g == world_size:
            assert lp.grad_broadcasts == ()


@pytest.mark.parametrize("world_size", [*range(1, 21), 24, 31, 32])
def test_group_count_is_linear_in_w(world_size: int) -> None:
    for g in range(1, world_size + 1):
        plan = build_plan(equal_layers(3 * world_size), world_size, g / world_size)
        assert plan.grad_workers == g
        groups = plan.groups()
        assert groups == sorted(set(groups)) and tuple(range(world_size)) in groups
        assert all(len(grp) >= 2 for grp in groups if grp != (0,))
        assert len(groups) <= 3 * world_size + 1
        if world_size % g == 0 and 1 < g < world_size:
            # KAISA's layout: W/g contiguous worker groups, g strided broadcast groups, and the world.
            assert len(groups) == 1 + world_size // g + g
            assert {lp.grad_workers for lp in plan.layers} == {tuple(range(k, k + g)) for k in range(0, world_size, g)}
        for lp in plan.layers:
            assert len(lp.grad_workers) == 1 or lp.grad_workers in groups
            assert all(tuple(sorted((s, *rec))) in groups for s, rec in lp.grad_broadcasts)


def test_windows_and_broadcasts_by_hand() -> None:
    # W=3, g=2: one window starting at every rank.
    assert [grad_worker_window(r, 3, 2) for r in range(3)] == [(0, 1), (1, 2), (0, 2)]
    assert [grad_broadcasts(r, 3, 2) for r in range(3)] == [((0, (2,)),), ((1, (0,)),), ((2, (1,)),)]
    # W=5, g=2, owner 4: window {4, 0}; offsets 2, 3, 4 = ranks 1, 2, 3 take workers at offsets 0, 1, 0.
    assert grad_worker_window(4, 5, 2) == (0, 4)
    assert grad_broadcasts(4, 5, 2) == ((0, (2,)), (4, (1, 3)))
    # W=4, f=0.75 -> g=3, owner 1: window {1, 2, 3}, rank 0 receives from rank 1.
    assert grad_worker_window(1, 4, 3) == (1, 2, 3)
    assert grad_broadcasts(1, 4, 3) == ((1, (0,)),)
    # W=8, g=2 (KAISA): owner 5 is in block (4, 5); columns are the residue classes mod 2.
    assert grad_worker_window(5, 8, 2) == (4, 5)
    assert grad_broadcasts(5, 8, 2) == ((4, (0, 2, 6)), (5, (1, 3, 7)))
    # W=6, g=4 (d=2): windows start at even ranks.
    assert grad_worker_window(5, 6, 4) == (0, 1, 4, 5)
    assert grad_broadcasts(5, 6, 4) == ((4, (2,)), (5, (3,)))


def test_w3_g2_plan() -> None:
    plan = build_plan(equal_layers(6), 3, "hybrid-opt")
    assert plan.grad_workers == 2
    assert {lp.grad_workers for lp in plan.layers} == {(0, 1), (1, 2), (0, 2)}
    assert plan.groups() == [(0, 1), (0, 1, 2), (0, 2), (1, 2)]


def test_world_size_one() -> None:
    layers = resnet50()[:5]
    for fraction in FRACTIONS:
        plan = build_plan(layers, 1, fraction)
        assert plan.grad_workers == 1
        assert all(lp.owner == 0 and lp.grad_workers == (0,) and lp.grad_broadcasts == () for lp in plan.layers)
        assert plan.groups() == [(0,)]
    assert build_plan([], 1).layers == ()


def test_fraction_resolution() -> None:
    layers = equal_layers(3)
    assert build_plan(layers, 8, "mem-opt").grad_worker_fraction == 1 / 8
    assert build_plan(layers, 8, "mem-opt").grad_workers == 1
    assert build_plan(layers, 8, "hybrid-opt").grad_workers == 4
    assert build_plan(layers, 8, "comm-opt").grad_workers == 8
    assert build_plan(layers, 4, 0.75).grad_workers == 3
    assert build_plan(layers, 5, "hybrid-opt").grad_workers == 2  # round(2.5) = 2 (half to even)
    assert build_plan(layers, 64, 0.001).grad_workers == 1  # at least one worker
    assert build_plan(layers, 8, 1).grad_worker_fraction == 1.0


@pytest.mark.parametrize("bad", [1.5, 0, 0.0, -0.25, float("nan"), float("inf"), "fast", "MEM-OPT", True, None])
def test_invalid_fraction(bad: object) -> None:
    with pytest.raises(ValueError, match=r"grad_worker_fraction must be in \(0, 1\] or one of 'mem-opt'"):
        build_plan(equal_layers(2), 4, bad)  # type: ignore[arg-type]


def test_invalid_fraction_message_names_value() -> None:
    with pytest.raises(ValueError) as info:
        build_plan(equal_layers(2), 4, 1.5)
    msg = str(info.value)
    assert msg.endswith("got 1.5") and "'hybrid-opt'" in msg and "'comm-opt'" in msg


@pytest.mark.parametrize("bad", ["time", "COMPUTE", None, 1])
def test_invalid_assignment(bad: object) -> None:
    with pytest.raises(ValueError, match=r"assignment must be one of 'compute', 'memory'; got"):
        build_plan(equal_layers(2), 4, assignment=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_invalid_world_size(bad: object) -> None:
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1; got"):
        build_plan(equal_layers(2), bad)  # type: ignore[arg-type]


def test_invalid_layers() -> None:
    with pytest.raises(ValueError, match="LayerShape.a_side must be an integer >= 1; got 0"):
        LayerShape("x", 0, 3, grad_numel=1)
    with pytest.raises(ValueError, match="LayerShape.blocks"):
        LayerShape("x", 2, 3, grad_numel=6, blocks=0)
    with pytest.raises(ValueError, match="LayerShape.grad_numel"):
        LayerShape("x", 2, 3, grad_numel=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LayerShape.name"):
        LayerShape("", 2, 3, grad_numel=6)
    with pytest.raises(ValueError, match="unique names; repeated: a"):
        build_plan([shape("a", 2, 2), shape("b", 2, 2), shape("a", 3, 3)], 2)


def test_costs_of_special_layers() -> None:
    assert compute_cost(shape("lin", 5, 3)) == 125 + 27
    assert memory_cost(shape("lin", 5, 3)) == 25 + 9
    assert compute_cost(shape("grp", 5, 3, blocks=4)) == 4 * (125 + 27)
    emb = LayerShape("emb", 1000, 8, grad_numel=8000, a_diagonal=True)
    assert compute_cost(emb) == 1000 + 512 and memory_cost(emb) == 1000 + 64


def test_deterministic_and_independent_of_input_order() -> None:
    layers = resnet50()
    plan = build_plan(layers, 12, 0.25)
    assert build_plan(layers, 12, 0.25) == plan
    shuffled = layers[:]
    random.Random(0).shuffle(shuffled)
    other = build_plan(shuffled, 12, 0.25)
    assert [lp.name for lp in other.layers] == [s.name for s in shuffled]  # plan keeps the order given
    assert {lp.name: lp for lp in other.layers} == {lp.name: lp for lp in plan.layers}
    assert [other.layer(s.name) for s in layers] == list(plan.layers)


def test_plan_is_data() -> None:
    layers = resnet50()
    plan = build_plan(layers, 6, 0.5)
    text = json.dumps(plan.to_dict())
    back = Plan.from_dict(json.loads(text))
    assert back == plan and hash(back) == hash(plan)
    assert back.fingerprint() == plan.fingerprint()
    assert len(plan.fingerprint()) == 16 and int(plan.fingerprint(), 16) >= 0
    assert build_plan(layers, 6, 1.0).fingerprint() != plan.fingerprint()
    assert build_plan(layers, 7, 0.5).fingerprint() != plan.fingerprint()
    assert plan.layer("fc").name == "fc"
    with pytest.raises(KeyError):
        plan.layer("nope")
    assert sorted(n for r in range(6) for n in plan.layers_owned_by(r)) == sorted(s.name for s in layers)
    for r in range(6):
        assert set(plan.layers_owned_by(r)) <= set(plan.layers_worked_by(r))
        assert all(r in plan.layer(n).grad_workers for n in plan.layers_worked_by(r))
    text = plan.describe()
    assert f"fingerprint={plan.fingerprint()}" in text and "world_size=6" in text
    assert len(text.splitlines()) == 2 + len(layers)
    for lp in plan.layers:
        line = next(ln for ln in text.splitlines() if ln.startswith(lp.name + " "))
        assert str(lp.owner) in line and ",".join(map(str, lp.grad_workers)) in line


def test_plan_rejects_broken_data() -> None:
    good = LayerPlan("a", 0, (0,), ((0, (1,)),))
    Plan(2, 0.5, 1, "compute", (good,))
    with pytest.raises(ValueError, match="must be 1 ranks incl. owner"):
        Plan(2, 0.5, 1, "compute", (LayerPlan("a", 1, (0,), ((0, (1,)),)),))
    with pytest.raises(ValueError, match="receive from one worker exactly once"):
        Plan(3, 0.5, 1, "compute", (LayerPlan("a", 0, (0,), ((0, (1,)),)),))
    with pytest.raises(ValueError, match="grad_workers must be in"):
        Plan(2, 0.5, 3, "compute", ())
    with pytest.raises(ValueError, match="unique"):
        Plan(2, 0.5, 1, "compute", (good, good))


def test_placement_imports_no_torch() -> None:
    for module in ("placement.py", "costs.py", "entries.py", "comm/layout.py", "comm/accounting.py"):
        tree = ast.parse((Path(placement.__file__).parent / module).read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] == "torch"], module


def test_large_world_is_fast_enough() -> None:
    # Planning is O(L * W): a 1,023-rank world with a window starting at every rank (gcd(1023, 512) = 1).
    plan = build_plan(resnet50(), 1023, "hybrid-opt")
    assert plan.grad_workers == 512 and math.gcd(1023, 512) == 1
    assert len(plan.groups()) <= 3 * 1023 + 1
