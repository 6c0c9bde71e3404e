"""What real gloo runs share: gradient averaging, time limits, the check of recorded bytes against the planner.

The check (:func:`check_against_planner`) is the one ``kfac-dist bench comm`` and tests/test_planner.py use.

The processes themselves come from :func:`kfac_dist.app.processes.run_gloo`, called with :data:`BENCH_LIMITS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch.distributed as dist
from torch import nn

from kfac_dist import costs
from kfac_dist.app.components import average_flat
from kfac_dist.placement import Plan
from kfac_dist.planner import STEP_KINDS, PlanReport, steps_per_period

__all__ = ["BENCH_LIMITS", "BenchLimits", "average_gradients", "bytes_delta", "check_against_planner", "step_kind"]

Traffic = Mapping[str, Mapping[str, float]]
DIRECTIONS = ("sent", "received")


class BenchLimits(TypedDict):
    """Keyword arguments of :func:`kfac_dist.app.processes.run_gloo` that bound a launch."""

    timeout: float
    pg_timeout: float


#: Time limits of a benchmark launch: the whole run, and each collective (W = 4 on 2 cores is slow).
BENCH_LIMITS: BenchLimits = {"timeout": 900.0, "pg_timeout": 120.0}


def average_gradients(model: nn.Module) -> int:
    """Average the gradients over the default group (the app's :func:`~kfac_dist.app.components.average_flat`).

    Returns:
        The bytes of the flat buffer (0 without a gradient or without an initialised group).
    """
    if not dist.is_initialized():
        return 0
    return average_flat(model, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.AVG))


def step_kind(step: int, freq: tuple[int, int]) -> str:
    """The :data:`~kfac_dist.planner.STEP_KINDS` kind of step ``step`` under ``(factor, inverse)`` periods."""
    flags = (step % freq[0] == 0, step % freq[1] == 0)
    return next(kind for kind, kind_flags in STEP_KINDS.items() if kind_flags == flags)


def bytes_delta(before: Traffic, after: Traffic) -> dict[str, dict[str, int]]:
    """``comm_stats()`` of one step: `after` minus `before`, per category (K-FAC's categories always present)."""
    zero = {"sent": 0, "received": 0}
    categories = sorted(set(after) | set(costs.CATEGORIES))
    return {c: {d: int(after.get(c, zero)[d] - before.get(c, zero)[d]) for d in DIRECTIONS} for c in categories}


def traffic(per_category: Traffic) -> float:
    """Bytes sent + received over every category."""
    return float(sum(v["sent"] + v["received"] for v in per_category.values()))


def check_against_planner(recorded: Sequence[Mapping[str, Any]], report: PlanReport) -> dict[str, Any]:
    """Compare what every rank recorded with the planner: plan, memory, and every step's bytes, exactly.

    Args:
        recorded: per rank, ``{"plan": plan.to_dict(), "memory": memory_usage(), "steps": [bytes_delta, ...]}`` of
            steps 0, 1, ... of a run with ``report.options``' schedule.
        report: the planner's report of the same model, world size and options.

    Returns:
        ``{"equal": bool, "mismatches": [first 20], "compared": count of compared integers, "steps", "kinds",
        "traffic": per rank}``, and ``"amortised_equal"`` when the run is whole periods (then the totals must be
        the steps times the planner's amortised bytes).
    """
    freq = (int(report.options.value("factor_update_steps", 0)), int(report.options.value("inv_update_steps", 0)))
    mismatches: list[str] = []
    compared = 0
    for rank, rec in enumerate(recorded):
        if Plan.from_dict(rec["plan"]) != report.plan:
            mismatches.append(f"rank {rank}: plan differs")
        compared += len(costs.MEMORY_CATEGORIES)
        if rec["memory"] != report.memory[rank]:
            mismatches.append(f"rank {rank}: memory {rec['memory']} != planner {report.memory[rank]}")
        for step, got in enumerate(rec["steps"]):
            extra = set(got) - set(costs.CATEGORIES)
            if any(got[c]["sent"] or got[c]["received"] for c in extra):
                mismatches.append(f"rank {rank} step {step}: bytes outside K-FAC's categories: {sorted(extra)}")
            expected = report.step_bytes[step_kind(step, freq)][rank]
            for category in costs.CATEGORIES:
                for direction in DIRECTIONS:
                    compared += 1
                    if got[category][direction] != expected[category][direction]:
                        mismatches.append(
                            f"rank {rank} step {step} {category} {direction}: recorded {got[category][direction]}, "
                            f"planner {expected[category][direction]}"
                        )
    steps = len(recorded[0]["steps"])
    totals = [traffic({c: {d: sum(s[c][d] for s in rec["steps"]) for d in DIRECTIONS} for c in costs.CATEGORIES})
              for rec in recorded]  # fmt: skip
    result: dict[str, Any] = {"equal": not mismatches, "mismatches": mismatches[:20], "compared": compared}
    result |= {"steps": steps, "kinds": sorted({step_kind(k, freq) for k in range(steps)}), "traffic": totals}
    if steps % steps_per_period(report.options)[0] == 0:  # whole periods: the totals are the amortised bytes x steps
        amortised = [traffic(report.amortised[r]) * steps for r in range(len(recorded))]
        pairs = zip(totals, amortised, strict=True)
        result["amortised_equal"] = all(abs(t - a) <= 1e-6 * max(1.0, a) for t, a in pairs)
    return result
