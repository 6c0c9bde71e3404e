"""Tests of kfac_dist.costs: closed-form bytes per step (per bucket, in the model of kfac_dist.comm.accounting),
amortised bytes, memory and decomposition load."""

from __future__ import annotations

import re
from collections import defaultdict
from fractions import Fraction

import pytest

from kfac_dist.comm.accounting import collective_bytes
from kfac_dist.costs import (
    CATEGORIES,
    ElementBytes,
    amortised_bytes,
    decomposition_load,
    factor_comm_numel,
    factor_storage_numel,
    memory_bytes,
    step_bytes,
)
from kfac_dist.methods import METHODS
from kfac_dist.options import OPTION_FIELDS, KFACOptions
from kfac_dist.placement import LayerPlan, LayerShape, Plan, build_plan, compute_cost

# Two layers, W = 2. fc1: A 3x3 (2 inputs + bias), G 2x2, 6 gradient elements; fc2: A 2x2, G 4x4, 8 elements.
FC1 = LayerShape("fc1", 3, 2, grad_numel=6)
FC2 = LayerShape("fc2", 2, 4, grad_numel=8)
TINY = [FC1, FC2]
# mem-opt: fc1 on rank 0, fc2 on rank 1, each sends its preconditioned gradient to the other rank.
MEM_OPT = Plan(2, 0.5, 1, "compute", (LayerPlan("fc1", 0, (0,), ((0, (1,)),)), LayerPlan("fc2", 1, (1,), ((1, (0,)),))))
# comm-opt: both ranks are grad workers of both layers; no gradient broadcast.
COMM_OPT = Plan(2, 1.0, 2, "compute", (LayerPlan("fc1", 0, (0, 1)), LayerPlan("fc2", 1, (0, 1))))


def flat(traffic: dict[int, dict[str, dict[str, int]]]) -> dict[tuple[int, str], tuple[int, int]]:
    return {(r, c): (v["sent"], v["received"]) for r, per in traffic.items() for c, v in per.items()}


def test_tiny_plans_are_what_build_plan_gives() -> None:
    # compute cost fc2 = 8 + 64 > fc1 = 27 + 8: fc2 is placed first, on rank 0.
    assert [lp.owner for lp in build_plan(TINY, 2, "mem-opt").layers] == [1, 0]
    assert build_plan(TINY, 2, "mem-opt").grad_workers == 1
    assert build_plan(TINY, 2, "comm-opt").grad_workers == 2


def test_tiny_mem_opt_by_hand() -> None:
    got = flat(step_bytes(MEM_OPT, TINY, sizes=ElementBytes(factor=4, inv=4, grad=2)))
    # Factors as triangles: fc1 3*4/2 + 2*3/2 = 9 elements = 36 B, fc2 2*3/2 + 4*5/2 = 13 elements = 52 B,
    # reduced to their owners over (0, 1): one bucket per owner. Chunks of 52 B: 26, 26; of 36 B: 18, 18.
    # Reduce of n to root r: the root sends n - c_r and receives 2 (n - c_r); the other sends n, receives n - c_p.
    # rank 0: non-root of fc2's 52 (52, 26) + root of fc1's 36 (18, 36); rank 1 the mirror image.
    assert got[0, "factor_reduce"] == (52 + 18, 26 + 36)
    assert got[1, "factor_reduce"] == (26 + 36, 52 + 18)
    # One grad worker per layer: no decomposition moves.
    assert got[0, "decomposition_broadcast"] == got[1, "decomposition_broadcast"] == (0, 0)
    # Gradients in 2-byte elements: fc1 6 * 2 = 12 B from rank 0, fc2 8 * 2 = 16 B from rank 1.
    # Broadcast of n from root r: the root sends 2 (n - c_r) and receives n - c_r; the other receives n and
    # sends n - c_p. rank 0: root of 12 (12, 6) + receiver of 16 (8, 16).
    assert got[0, "gradient_broadcast"] == (12 + 8, 6 + 16)
    assert got[1, "gradient_broadcast"] == (6 + 16, 12 + 8)
    # A plain step moves only gradients.
    plain = flat(step_bytes(MEM_OPT, TINY, factor_step=False, inverse_step=False, sizes=ElementBytes(grad=2)))
    assert plain[0, "factor_reduce"] == (0, 0) and plain[0, "gradient_broadcast"] == (20, 22)
    # Full squares instead of triangles: fc1 9 + 4 = 13 elements = 52 B (root 0), fc2 4 + 16 = 20 = 80 B.
    square = flat(step_bytes(MEM_OPT, TINY, KFACOptions(symmetric_comm=False)))
    assert square[0, "factor_reduce"] == (80 + 26, 40 + 52)
    # Sizes that do not split evenly: 1-byte factors, fc2 13 B (chunks 7, 6), fc1 9 B (chunks 5, 4).
    odd = flat(step_bytes(MEM_OPT, TINY, sizes=ElementBytes(factor=1)))
    assert odd[0, "factor_reduce"] == (13 + (9 - 5), (13 - 7) + 2 * (9 - 5))  # non-root of 13, root of 9
    assert odd[1, "factor_reduce"] == ((13 - 6) + 9, 2 * (13 - 6) + (9 - 4))  # root of 13, non-root of 9


def test_tiny_comm_opt_by_hand() -> None:
    got = flat(step_bytes(COMM_OPT, TINY, sizes=ElementBytes(factor=2, inv=4, grad=4)))
    # 2-byte factors: fc2 26 B to rank 1 (chunks 13), fc1 18 B to rank 0 (chunks 9).
    assert got[0, "factor_reduce"] == (26 + 9, 13 + 18) and got[1, "factor_reduce"] == (13 + 18, 26 + 9)
    # eigen: Q_A a^2, l_A a, Q_G g^2, l_G g (4 B each), broadcast from the owner over (0, 1).
    # fc1: 9 + 3 + 4 + 2 = 18 elements = 72 B from rank 0; fc2: 4 + 2 + 16 + 4 = 26 elements = 104 B from rank 1.
    # rank 0: root of 72 (2 * 36, 36) + receiver of 104 (104 - 52, 104); rank 1 the mirror image.
    assert got[0, "decomposition_broadcast"] == (72 + 52, 36 + 104)
    assert got[1, "decomposition_broadcast"] == (104 + 36, 52 + 72)
    assert got[0, "gradient_broadcast"] == got[1, "gradient_broadcast"] == (0, 0)
    # inverse: A^-1, G^-1 as triangles (fc1 6 + 3 = 36 B, fc2 3 + 10 = 52 B) or squares (52 B, 80 B).
    inv = flat(step_bytes(COMM_OPT, TINY, KFACOptions(compute_method="inverse")))
    assert inv[0, "decomposition_broadcast"] == (36 + 26, 18 + 52)
    inv_sq = flat(step_bytes(COMM_OPT, TINY, KFACOptions(compute_method="inverse", symmetric_comm=False)))
    assert inv_sq[0, "decomposition_broadcast"] == (52 + 40, 26 + 80)
    # KAISA's allreduce of factors: one bucket of 9 + 13 elements = 88 B, chunks 44: 2 (88 - 44) each way.
    ar = flat(step_bytes(COMM_OPT, TINY, KFACOptions(factor_comm="allreduce")))
    assert ar[0, "factor_reduce"] == ar[1, "factor_reduce"] == (88, 88)
    # Inverse step without factor step: decompositions only.
    only_inv = flat(step_bytes(COMM_OPT, TINY, factor_step=False))
    assert only_inv[0, "factor_reduce"] == (0, 0) and only_inv[0, "decomposition_broadcast"] == (124, 140)


def test_bytes_are_counted_per_bucket() -> None:
    # KAISA, 1-byte factors, a cap of 10 elements: entries fc2/A 3, fc2/G 10, fc1/A 6, fc1/G 3 (reverse order)
    # fill buckets of 3, 10 and 6 + 3 = 9 bytes. Allreduce 2 (n - c_p) per bucket: chunks of 3 are (2, 1),
    # of 10 (5, 5), of 9 (5, 4).
    split = flat(
        step_bytes(
            COMM_OPT, TINY, KFACOptions(factor_comm="allreduce", bucket_cap_mb=10 / 2**20), sizes=ElementBytes(factor=1)
        )
    )
    assert split[0, "factor_reduce"] == (2 + 10 + 8,) * 2
    assert split[1, "factor_reduce"] == (4 + 10 + 10,) * 2
    # One bucket of 22 bytes (chunks 11, 11) moves a different amount: the model is not linear in the size.
    whole = flat(step_bytes(COMM_OPT, TINY, KFACOptions(factor_comm="allreduce"), sizes=ElementBytes(factor=1)))
    assert whole[0, "factor_reduce"] == whole[1, "factor_reduce"] == (22, 22)
    # The buckets of the factor reduction are what every rank holds as buffers, whatever the cap.
    assert (
        memory_bytes(COMM_OPT, TINY, KFACOptions(bucket_cap_mb=10 / 2**20), sizes=ElementBytes(factor=1))[0]["buffers"]
        == 22
    )


def test_tiny_memory_by_hand() -> None:
    mem = memory_bytes(MEM_OPT, TINY)
    # Factors in full squares (4 B): fc1 9 + 4 = 13 -> 52 B on rank 0, fc2 4 + 16 = 20 -> 80 B on rank 1.
    # Buffers: the factor-reduction buckets, packed triangles of both layers (9 + 13 elements), on every rank.
    assert mem[0] == {"factors": 52, "decompositions": 72, "buffers": 88}
    assert mem[1] == {"factors": 80, "decompositions": 104, "buffers": 88}
    mem = memory_bytes(
        COMM_OPT, TINY, KFACOptions(factor_comm="allreduce", compute_method="inverse"), sizes=ElementBytes(inv=2)
    )
    # Every rank: all factors, both inverses (fc1 13 + fc2 20 elements in 2 B), all buckets.
    assert mem[0] == mem[1] == {"factors": 132, "decompositions": 66, "buffers": 88}
    square = memory_bytes(MEM_OPT, TINY, KFACOptions(symmetric_comm=False))
    assert square[0]["buffers"] == square[1]["buffers"] == 132  # unpacked: 13 + 20 elements


def test_special_layers_numel() -> None:
    emb = LayerShape("emb", 5, 3, grad_numel=15, a_diagonal=True)
    assert factor_comm_numel(emb) == 5 + 6 and factor_comm_numel(emb, symmetric_comm=False) == 5 + 9
    assert METHODS["eigen"].comm_numel(emb, symmetric_comm=True) == 5 + 9 + 3  # eigen: no Q_A, only the diagonal
    assert METHODS["inverse"].comm_numel(emb, symmetric_comm=True) == 5 + 6
    assert factor_storage_numel(emb) == 5 + 9
    grouped = LayerShape("conv", 2, 3, grad_numel=12, blocks=2)
    assert factor_comm_numel(grouped) == 2 * (3 + 6)
    assert METHODS["eigen"].comm_numel(grouped, symmetric_comm=True) == 2 * (4 + 2 + 9 + 3)
    assert factor_storage_numel(grouped) == 2 * (4 + 9)


def layers_mixed() -> list[LayerShape]:
    out = [LayerShape(f"lin{i}", 10 + 7 * i, 5 + 3 * i, grad_numel=(10 + 7 * i) * (5 + 3 * i)) for i in range(9)]
    out.append(LayerShape("emb", 50, 6, grad_numel=300, a_diagonal=True))
    out.append(LayerShape("dw", 10, 1, grad_numel=40, blocks=4))
    return out


PLAN_CASES = [(w, f) for w in (1, 2, 3, 4, 5, 8) for f in ("mem-opt", "hybrid-opt", 0.75, "comm-opt")]


def by_target(plan: Plan, layers: list[LayerShape], factor_comm: str, method: str) -> dict[int, dict[str, list[int]]]:
    """The protocol, written out from the plan: one collective per (op, group, root), of the summed bytes of the
    layers that share it (everything fits one 25 MiB bucket here), charged with the accounting model."""
    shapes = {s.name: s for s in layers}
    world = tuple(range(plan.world_size))
    sizes: dict[tuple[str, str, tuple[int, ...], int | None], int] = defaultdict(int)
    for lp in plan.layers:
        shape = shapes[lp.name]
        reduce = ("reduce", world, lp.owner) if factor_comm == "owner" else ("allreduce", world, None)
        sizes[("factor_reduce", *reduce)] += 4 * factor_comm_numel(shape)
        if len(lp.grad_workers) > 1:
            n = 4 * METHODS[method].comm_numel(shape, symmetric_comm=True)
            sizes[("decomposition_broadcast", "broadcast", tuple(sorted(lp.grad_workers)), lp.owner)] += n
        for src, receivers in lp.grad_broadcasts:
            group = tuple(sorted((src, *receivers)))
            sizes[("gradient_broadcast", "broadcast", group, src)] += 2 * shape.grad_numel
    out = {r: {c: [0, 0] for c in CATEGORIES} for r in world}
    for (category, op, group, root), n in sizes.items():
        for r in group:
            sent, received = collective_bytes(op, n, group, r, root)
            out[r][category][0] += sent
            out[r][category][1] += received
    return out


@pytest.mark.parametrize("world_size,fraction", PLAN_CASES)
@pytest.mark.parametrize("factor_comm", ["owner", "allreduce"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_traffic_identities(world_size: int, fraction: str | float, factor_comm: str, method: str) -> None:
    layers = layers_mixed()
    plan = build_plan(layers, world_size, fraction)
    w = world_size
    t = step_bytes(
        plan, layers, KFACOptions(factor_comm=factor_comm, compute_method=method), sizes=ElementBytes(grad=2)
    )
    expected = by_target(plan, layers, factor_comm, method)
    assert {r: {c: [v["sent"], v["received"]] for c, v in p.items()} for r, p in t.items()} == expected
    total = {c: [sum(t[r][c][d] for r in range(w)) for d in ("sent", "received")] for c in CATEGORIES}
    for category in CATEGORIES:  # every byte sent is received by someone
        assert total[category][0] == total[category][1], category
    n_factor = 4 * sum(factor_comm_numel(s) for s in layers)
    if factor_comm == "allreduce":  # 2 (n - c_p) summed over the world: 2 (W - 1) n, however it is bucketed
        assert total["factor_reduce"][0] == 2 * (w - 1) * n_factor
    elif w > 1:  # a reduce moves (W - 1) n + n - c_root
        assert (w - 1) * n_factor < total["factor_reduce"][0] <= w * n_factor
    for r in range(w):  # a rank receives at least every gradient it does not compute
        needed = sum(2 * s.grad_numel for s in layers if r not in plan.layer(s.name).grad_workers)
        assert t[r]["gradient_broadcast"]["received"] >= needed


def test_owner_reduction_moves_about_half_of_kaisa() -> None:
    layers = layers_mixed()
    plan = build_plan(layers, 8, "comm-opt")

    def factor_total(factor_comm: str) -> int:
        t = step_bytes(plan, layers, KFACOptions(factor_comm=factor_comm), inverse_step=False)
        return sum(t[r]["factor_reduce"]["sent"] + t[r]["factor_reduce"]["received"] for r in t)

    assert 0.5 < factor_total("owner") / factor_total("allreduce") < 0.6


@pytest.mark.parametrize("world_size,fraction", PLAN_CASES)
def test_memory_identities(world_size: int, fraction: str | float) -> None:
    layers = layers_mixed()
    plan = build_plan(layers, world_size, fraction)
    total_factors = 4 * sum(factor_storage_numel(s) for s in layers)
    packed_factors = 4 * sum(factor_comm_numel(s) for s in layers)
    owner = memory_bytes(plan, layers)
    assert sum(m["factors"] for m in owner.values()) == total_factors  # each factor lives on one rank
    # every rank holds every bucket; a world of one sends nothing and keeps the batch factors as they are, unpacked
    buffers = total_factors if world_size == 1 else packed_factors
    assert all(m["buffers"] == buffers for m in owner.values())
    allreduce = memory_bytes(plan, layers, KFACOptions(factor_comm="allreduce"))
    assert all(m["factors"] == total_factors for m in allreduce.values())  # every rank holds every factor
    assert all(m["buffers"] == buffers for m in allreduce.values())
    square = memory_bytes(plan, layers, KFACOptions(symmetric_comm=False))
    assert all(m["buffers"] == total_factors for m in square.values())
    total_dec = 4 * sum(METHODS["eigen"].comm_numel(s, symmetric_comm=False) for s in layers)
    assert sum(m["decompositions"] for m in owner.values()) == plan.grad_workers * total_dec
    if plan.grad_workers == world_size:  # comm-opt: every rank holds every decomposition
        assert all(m["decompositions"] == total_dec for m in owner.values())


def test_mem_opt_vs_comm_opt() -> None:
    layers = layers_mixed()
    mem_opt, comm_opt = build_plan(layers, 4, "mem-opt"), build_plan(layers, 4, "comm-opt")
    m1, m2 = memory_bytes(mem_opt, layers), memory_bytes(comm_opt, layers)
    assert sum(m["decompositions"] for m in m2.values()) == 4 * sum(m["decompositions"] for m in m1.values())
    t1, t2 = step_bytes(mem_opt, layers), step_bytes(comm_opt, layers)
    assert all(t1[r]["decomposition_broadcast"] == {"sent": 0, "received": 0} for r in range(4))
    assert all(t2[r]["gradient_broadcast"] == {"sent": 0, "received": 0} for r in range(4))
    assert all(t1[r]["gradient_broadcast"]["received"] > 0 for r in range(4))


def test_amortised() -> None:
    layers = layers_mixed()
    plan = build_plan(layers, 5, "hybrid-opt")
    options, sizes = (
        KFACOptions(compute_method="inverse", factor_update_steps=2, inv_update_steps=3),
        ElementBytes(2, 4, 2),
    )
    got = amortised_bytes(plan, layers, options, sizes=sizes)
    # simulate six steps: k = 0..5, factor steps 0, 2, 4 and inverse steps 0, 3 (step 3 is not a factor step)
    sim = {r: {c: {"sent": Fraction(0), "received": Fraction(0)} for c in CATEGORIES} for r in range(5)}
    for k in range(6):
        step = step_bytes(plan, layers, options, factor_step=k % 2 == 0, inverse_step=k % 3 == 0, sizes=sizes)
        for r in range(5):
            for c in CATEGORIES:
                for d in ("sent", "received"):
                    sim[r][c][d] += Fraction(step[r][c][d], 6)
    assert got == {r: {c: {d: float(v) for d, v in x.items()} for c, x in p.items()} for r, p in sim.items()}
    every = amortised_bytes(plan, layers, KFACOptions(factor_update_steps=1, inv_update_steps=1))
    full = step_bytes(plan, layers)
    assert every == {r: {c: {d: float(v) for d, v in x.items()} for c, x in p.items()} for r, p in full.items()}
    factors = step_bytes(plan, layers, inverse_step=False)
    rare = amortised_bytes(plan, layers, KFACOptions(factor_update_steps=10, inv_update_steps=100))
    assert rare[0]["factor_reduce"]["sent"] == factors[0]["factor_reduce"]["sent"] / 10


def test_decomposition_load() -> None:
    layers = layers_mixed()
    plan = build_plan(layers, 3, "comm-opt")
    load = decomposition_load(plan, layers)
    assert len(load.per_rank) == 3 and sum(load.per_rank) == sum(compute_cost(s) for s in layers)
    for r in range(3):
        assert load.per_rank[r] == sum(compute_cost(s) for s in layers if plan.layer(s.name).owner == r)
    assert load.max == max(load.per_rank) and load.mean == sum(load.per_rank) / 3
    assert load.imbalance == pytest.approx(load.max / load.mean) and load.imbalance < 1.2
    assert decomposition_load(build_plan(layers, 1), layers).imbalance == 1.0
    assert decomposition_load(build_plan([], 2), []).imbalance == 1.0


def test_layers_must_match_plan() -> None:
    with pytest.raises(ValueError, match="layers must match the plan's layers; missing: \\['fc2'\\]"):
        step_bytes(MEM_OPT, [FC1])
    with pytest.raises(ValueError, match="not in the plan: \\['x'\\]"):
        memory_bytes(MEM_OPT, [*TINY, LayerShape("x", 2, 2, grad_numel=4)])
    assert flat(step_bytes(MEM_OPT, [FC2, FC1])) == flat(step_bytes(MEM_OPT, TINY))  # order does not matter


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"compute_method": "svd"}, "compute_method must be one of 'eigen', 'inverse', 'eigen_warm'; got 'svd'"),
        ({"factor_comm": "ring"}, "factor_comm must be one of 'owner', 'allreduce'; got 'ring'"),
        ({"factor_bytes": 0}, "factor_bytes must be an integer >= 1; got 0"),
        ({"inv_bytes": 2.0}, "inv_bytes must be an integer >= 1; got 2.0"),
        ({"grad_bytes": True}, "grad_bytes must be an integer >= 1; got True"),
        ({"symmetric_comm": "yes"}, "symmetric_comm must be True or False; got 'yes'"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a number in (0, inf); got 0"),
        ({"bucket_cap_mb": "25"}, "bucket_cap_mb must be a number in (0, inf); got '25'"),
        ({"factor_step": 1}, "factor_step must be True or False; got 1"),
    ],
)
def test_step_bytes_rejects_bad_options(kwargs: dict[str, object], option: str) -> None:
    """Each bad value fails where it is given: in KFACOptions, ElementBytes or step_bytes itself."""
    sizes = {key.removesuffix("_bytes"): value for key, value in kwargs.items() if key.endswith("_bytes")}
    options = {key: value for key, value in kwargs.items() if key in OPTION_FIELDS}
    rest = {key: value for key, value in kwargs.items() if key not in options and not key.endswith("_bytes")}
    with pytest.raises(ValueError, match=re.escape(option)):
        step_bytes(MEM_OPT, TINY, KFACOptions(**options), sizes=ElementBytes(**sizes), **rest)  # type: ignore[arg-type]


def test_other_functions_reject_bad_options() -> None:
    with pytest.raises(ValueError, match=re.escape("factor_update_steps must be an integer in [1, inf); got 0")):
        amortised_bytes(MEM_OPT, TINY, KFACOptions(factor_update_steps=0, inv_update_steps=1))
    with pytest.raises(ValueError, match=re.escape("inv_update_steps must be an integer in [1, inf); got 1.5")):
        amortised_bytes(MEM_OPT, TINY, KFACOptions(factor_update_steps=1, inv_update_steps=1.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compute_method must be one of"):
        amortised_bytes(MEM_OPT, TINY, KFACOptions(factor_update_steps=1, inv_update_steps=1, compute_method="qr"))
    with pytest.raises(ValueError, match="factor_comm must be one of"):
        memory_bytes(MEM_OPT, TINY, KFACOptions(factor_comm="all"))
    with pytest.raises(ValueError, match="inv_bytes must be an integer >= 1"):
        memory_bytes(MEM_OPT, TINY, sizes=ElementBytes(inv=-4))
    with pytest.raises(ValueError, match="bucket_cap_mb must be a number in"):
        memory_bytes(MEM_OPT, TINY, KFACOptions(bucket_cap_mb=-1.0))
    with pytest.raises(ValueError, match="symmetric_comm must be True or False"):
        memory_bytes(MEM_OPT, TINY, KFACOptions(symmetric_comm=None))  # type: ignore[arg-type]
