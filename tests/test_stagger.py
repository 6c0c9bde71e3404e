"""inv_stagger: decompositions spread over the period, each layer at its phase, with the same results as decomposing
every layer at once for the layers at the same step, and bytes the closed form predicts, on one rank and on two."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from distributed_cases import BASE_OPTIONS, global_batch, make_model
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner, costs
from kfac_dist.comm import LocalCommunicator, TorchDistCommunicator
from kfac_dist.costs import ElementBytes
from kfac_dist.methods import get_method
from kfac_dist.options import KFACOptions
from kfac_dist.placement import LayerShape, build_plan
from kfac_dist.schedule import DecompositionSchedule, decomposition_phases

PERIOD = 3
STEPS = 8


def shapes() -> list[LayerShape]:
    sides = [(10, 4), (20, 8), (30, 2), (5, 5), (40, 10), (12, 12), (7, 3)]
    return [LayerShape(f"l{i}", a, g, grad_numel=a * g) for i, (a, g) in enumerate(sides)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_phases_balance_each_owners_work_within_one_layer(world_size: int) -> None:
    layers = shapes()
    plan = build_plan(layers, world_size, "mem-opt")
    phases = decomposition_phases(plan, layers, PERIOD, "eigen")
    assert phases == decomposition_phases(plan, layers, PERIOD, "eigen")  # every rank computes the same
    assert set(phases) == {s.name for s in layers} and set(phases.values()) <= set(range(PERIOD))
    cost = {s.name: get_method("eigen").decomposition_flops(s) for s in layers}
    for rank in range(world_size):
        owned = plan.layers_owned_by(rank)
        load = [sum(cost[n] for n in owned if phases[n] == p) for p in range(PERIOD)]
        assert max(load) <= sum(load) / PERIOD + max(cost[n] for n in owned)  # Graham's LPT bound


def test_every_layer_is_decomposed_once_per_period_and_all_on_the_first_step() -> None:
    layers = shapes()
    plan = build_plan(layers, 1, "comm-opt")
    schedule = DecompositionSchedule(plan, layers, KFACOptions(inv_update_steps=PERIOD, inv_stagger=True))
    assert schedule.due(0) == tuple(s.name for s in layers)
    period = [name for k in range(PERIOD, 2 * PERIOD) for name in schedule.due(k)]
    assert sorted(period) == sorted(s.name for s in layers)  # each once
    assert max(len(schedule.due(k)) for k in range(1, 2 * PERIOD)) < len(layers)  # no step carries all of them
    plain = DecompositionSchedule(plan, layers, KFACOptions(inv_update_steps=PERIOD))
    assert [bool(plain.due(k)) for k in range(2 * PERIOD)] == [True, False, False, True, False, False]


def test_a_callable_period_cannot_be_staggered() -> None:
    with pytest.raises(ValueError, match="inv_stagger needs a constant inv_update_steps"):
        KFACOptions(inv_stagger=True, inv_update_steps=lambda step: 10)


def frozen_run(stagger: bool) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Decompositions after each step of a run whose parameters never move (so factors match across runs)."""
    model = make_model()
    options = replace(BASE_OPTIONS, inv_update_steps=PERIOD, factor_update_steps=1, inv_stagger=stagger)
    pre = KFACPreconditioner(model, options, lr=0.1)
    history = []
    for step in range(STEPS):
        x, y = global_batch(step, 1)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()  # no optimizer step: the factors depend on the batches alone
        history.append({n: dict(s.decomposition.tensors) for n, s in pre._states.items() if s.decomposition})
    return history


def test_staggered_decompositions_equal_the_unstaggered_ones_at_the_same_step() -> None:
    staggered, plain = frozen_run(True), frozen_run(False)
    model = make_model()
    pre = KFACPreconditioner(model, replace(BASE_OPTIONS, inv_update_steps=PERIOD, inv_stagger=True))
    phases = pre._schedule.phases
    assert phases is not None and len(set(phases.values())) > 1  # the layers really are spread
    for step in range(STEPS):
        for name, phase in phases.items():
            # a layer holds the decomposition of the last step of its phase; so does the plain run at its steps
            last = step if step == 0 else max(k for k in range(step + 1) if k % PERIOD == phase or k == 0)
            if last % PERIOD == 0:
                for field, tensor in plain[step if step % PERIOD == 0 else step - step % PERIOD][name].items():
                    torch.testing.assert_close(staggered[step][name][field], tensor, rtol=0, atol=0)
            else:
                assert not torch.equal(staggered[step][name]["q_g"], staggered[last - 1][name]["q_g"])


def staggered_distributed(rank: int, world_size: int) -> dict[str, Any]:
    torch.set_default_dtype(torch.float64)
    options = replace(BASE_OPTIONS, inv_update_steps=PERIOD, inv_stagger=True, grad_worker_fraction="comm-opt")

    def train(
        comm: Any, world: int, me: int, phases: dict[str, int] | None = None
    ) -> tuple[KFACPreconditioner, list[torch.Tensor]]:
        model = make_model()
        pre = KFACPreconditioner(model, options, lr=0.1, communicator=comm)
        if phases is not None:  # the phases balance each rank's own layers, so they depend on the placement
            pre._schedule.phases = phases
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            x, y = global_batch(step, world_size)
            part = slice(me * len(x) // world, (me + 1) * len(x) // world)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            if world > 1:
                for p in model.parameters():
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
            pre.step()
            optimizer.step()
        return pre, [p.detach().clone() for p in model.parameters()]

    pre, params = train(TorchDistCommunicator(), world_size, rank)
    _, reference = train(LocalCommunicator(), 1, 0, pre._schedule.phases)
    shapes = [s.shape() for s in pre._states.values()]
    expected: dict[str, dict[str, int]] = {}
    for step in range(STEPS):
        due = pre._schedule.due(step)
        traffic = costs.step_bytes(
            pre.plan(),
            shapes,
            pre.options,
            factor_step=step % options.factor_update_steps == 0,
            inverse_step=bool(due),
            decomposed=set(due),
            sizes=ElementBytes(factor=8, inv=8, grad=8),
        )[rank]
        for category, counts in traffic.items():
            entry = expected.setdefault(category, {"sent": 0, "received": 0})
            entry["sent"] += counts["sent"]
            entry["received"] += counts["received"]
    error = max(((p - r).abs().max() / r.abs().max()).item() for p, r in zip(params, reference, strict=True))
    measured = {c: v for c, v in pre.comm_stats().items() if v["sent"] or v["received"]}
    return {"error": error, "bytes": measured, "expected": {c: v for c, v in expected.items() if any(v.values())}}


def test_staggered_distributed_run_equals_one_process_and_moves_the_predicted_bytes() -> None:
    results = run_multiproc(staggered_distributed, 2, timeout=300)
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert result["error"] < 1e-6, (rank, result["error"])
        assert result["bytes"] == result["expected"], rank
        assert "decomposition_broadcast" in result["bytes"], rank  # comm-opt: the decompositions really travel
