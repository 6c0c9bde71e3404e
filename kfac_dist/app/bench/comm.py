"""Communication and memory per rank: ResNet-50 from the planner, ours beside KAISA, checked on real gloo runs.

Protocol: docs/BENCHMARKS.md section 3.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist import KFACPreconditioner, costs
from kfac_dist.app.bench.comm_report import FRACTION_TITLES, FRACTIONS, SCHEMES
from kfac_dist.app.bench.common import PROXY, Log, ModelSpec, positive_int
from kfac_dist.app.bench.gloo_runs import BENCH_LIMITS, average_gradients, bytes_delta, check_against_planner, traffic
from kfac_dist.app.processes import run_gloo
from kfac_dist.comm import TorchDistCommunicator
from kfac_dist.options import KFACOptions
from kfac_dist.placement import num_grad_workers, resolve_grad_worker_fraction
from kfac_dist.planner import STEP_KINDS, PlanReport, plan_model, steps_per_period

__all__ = ["FREQ", "FULL", "PLANNED", "add_arguments", "exit_code", "planner_sweep", "real_check", "run", "summarize"]

FULL = "the docs/ run: --check-steps 100 (one whole period)"
#: Factor and inverse periods of every number here.
FREQ = (10, 100)
#: The planned model: ResNet-50 on 224x224 inputs, 1000 classes.
PLANNED = ModelSpec("resnet50", {}, (3, 224, 224))
WORLD_SIZES = (8, 64, 256, 1024)


def options(fraction: str, scheme: str, freq: tuple[int, int] = FREQ) -> KFACOptions:
    """The preconditioner's options of one fraction and scheme."""
    return KFACOptions(
        grad_worker_fraction=fraction, factor_update_steps=freq[0], inv_update_steps=freq[1], **SCHEMES[scheme]
    )


def _mean_max(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "max": max(values)}


def summarize(report: PlanReport) -> dict[str, Any]:
    """Mean and max over ranks of the traffic (sent + received) per step kind and amortised, and of memory."""
    counts = steps_per_period(report.options)[1]
    per_kind: dict[str, Mapping[int, Mapping[str, Mapping[str, float]]]] = {
        kind: report.step_bytes[kind] for kind in STEP_KINDS if counts[kind]
    }
    per_kind["amortised"] = report.amortised
    result: dict[str, Any] = {}
    for kind, per_rank in per_kind.items():
        ranks = list(per_rank.values())
        entry = _mean_max([traffic(r) for r in ranks])
        entry["max_sent"] = max(sum(c["sent"] for c in r.values()) for r in ranks)
        entry["max_received"] = max(sum(c["received"] for c in r.values()) for r in ranks)
        entry["by_category"] = {
            c: _mean_max([r[c]["sent"] + r[c]["received"] for r in ranks]) for c in costs.CATEGORIES
        }
        result[kind] = entry
    memory = _mean_max([float(sum(m.values())) for m in report.memory.values()])
    memory["by_category_max"] = {c: max(m[c] for m in report.memory.values()) for c in costs.MEMORY_CATEGORIES}
    busiest = max(report.memory, key=lambda r: sum(report.memory[r].values()))
    memory["busiest_rank"] = dict(report.memory[busiest])
    return {
        "grad_workers": report.plan.grad_workers,
        "bytes": result,
        "memory": memory,
        "load_imbalance": report.load.imbalance,
    }


def planner_sweep(
    model: nn.Module, world_sizes: Sequence[int], freq: tuple[int, int] = FREQ, log: Log = print
) -> list[dict[str, Any]]:
    """:func:`summarize` of ``plan_model`` for every W, fraction and scheme (rows in that order)."""
    rows = []
    for world_size in world_sizes:
        for fraction in FRACTIONS:
            started = time.perf_counter()
            row: dict[str, Any] = {"world_size": world_size, "fraction": fraction, "schemes": {}}
            for scheme in SCHEMES:
                row["schemes"][scheme] = summarize(plan_model(model, world_size, options(fraction, scheme, freq)))
            row["grad_workers"] = row["schemes"]["ours"]["grad_workers"]
            rows.append(row)
            log(f"  planned W={world_size} f={FRACTION_TITLES[fraction]} ({time.perf_counter() - started:.1f} s)")
    return rows


def real_cases(world_size: int) -> list[dict[str, Any]]:
    """Every (fraction, scheme) of the real check at `world_size`; fractions giving the same g run once."""
    cases, seen = [], set()
    for fraction in FRACTIONS:
        workers = num_grad_workers(resolve_grad_worker_fraction(fraction, world_size), world_size)
        if workers not in seen:
            seen.add(workers)
            cases += [{"fraction": fraction, "scheme": scheme} for scheme in SCHEMES]
    return cases


def train_and_record(
    rank: int,
    world_size: int,
    proxy: ModelSpec,
    cases: list[dict[str, Any]],
    steps: int,
    batch: int,
    freq: tuple[int, int],
) -> list[dict[str, Any]]:
    """In each gloo process: every case trains `steps` steps; each step's byte counts and the final memory."""
    out = []
    for case in cases:
        model = proxy.build()
        pre = KFACPreconditioner(
            model, options(case["fraction"], case["scheme"], freq), lr=0.01, communicator=TorchDistCommunicator()
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        per_step = []
        for step in range(steps):
            x, y = proxy.batch(batch, torch.Generator().manual_seed(1000 * step + rank))
            before = pre.comm_stats()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            average_gradients(model)  # the user's gradient averaging (default group): not K-FAC's bytes
            pre.step()
            optimizer.step()
            per_step.append(bytes_delta(before, pre.comm_stats()))
        out.append({"plan": pre.plan().to_dict(), "steps": per_step, "memory": pre.memory_usage()})
        pre.remove_hooks()
    return out


def real_check(
    world_sizes: Sequence[int],
    steps: int,
    batch: int = 4,
    proxy: ModelSpec = PROXY,
    freq: tuple[int, int] = FREQ,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Real gloo runs at every W of `world_sizes`, each case compared with the planner (see the module doc)."""
    rows = []
    for world_size in world_sizes:
        cases = real_cases(world_size)
        started = time.perf_counter()
        recorded = run_gloo(train_and_record, world_size, proxy, cases, steps, batch, freq, **BENCH_LIMITS)
        seconds = time.perf_counter() - started
        model = proxy.build_meta()
        for index, case in enumerate(cases):
            report = plan_model(model, world_size, options(case["fraction"], case["scheme"], freq))
            check = check_against_planner([per_rank[index] for per_rank in recorded], report)
            memory = [sum(per_rank[index]["memory"].values()) for per_rank in recorded]
            rows.append({"world_size": world_size, **case, "grad_workers": report.plan.grad_workers, **check})
            rows[-1]["memory"] = memory
        equal = sum(r["equal"] for r in rows if r["world_size"] == world_size)
        log(f"  real gloo runs W={world_size}: {len(cases)} cases, {equal} equal to the planner ({seconds:.0f} s)")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench comm``."""
    parser.add_argument("--world-sizes", nargs="+", type=positive_int, default=list(WORLD_SIZES), help="planned W")
    parser.add_argument("--check-world-sizes", nargs="*", type=positive_int, default=[2, 4], help="real gloo runs at W")
    parser.add_argument("--check-steps", type=positive_int, help="steps per real run (default 11; --full 100)")
    parser.add_argument("--check-batch", type=positive_int, default=4, help="per-rank batch of the real runs")


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], None]:
    """The planner sweep and the real-run check of parsed options; the results (no settings)."""
    steps = args.check_steps or (FREQ[1] if args.full else FREQ[0] + 1)
    log(f"planner: {PLANNED.builder} at W = {', '.join(map(str, args.world_sizes))}")
    planned = planner_sweep(PLANNED.build_meta(), args.world_sizes, log=log)
    log(f"real gloo runs: ResNet-50 width 1/8, {steps} steps, batch {args.check_batch} per rank")
    checks = real_check(args.check_world_sizes, steps, args.check_batch, log=log)
    results: dict[str, Any] = {"planned_model": PLANNED.builder, "freq": list(FREQ), "planner": planned}
    results["check"] = {"proxy": PROXY.describe(), "steps": steps, "batch": args.check_batch, "cases": checks}
    return results, None


def exit_code(results: dict[str, Any]) -> int:
    """1 if a real run differed from the planner."""
    return 0 if all(case["equal"] for case in results["check"]["cases"]) else 1
