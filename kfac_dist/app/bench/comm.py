"""Communication and memory per rank: ResNet-50 from the planner, ours beside KAISA, checked on real gloo runs.

Protocol (``kfac-dist bench comm``; docs/BENCHMARKS.md section 3 quotes the ``--full`` run):

1. Planner (no processes). For ResNet-50 (224x224, 1000 classes, float32 everywhere) at every world size W of
   ``--world-sizes`` and every grad-worker fraction f in {1/W ("mem-opt"), 0.5 ("hybrid-opt"), 1 ("comm-opt")},
   :func:`kfac_dist.planner.plan_model` gives the bytes each rank sends + receives in each kind of step (factor,
   inverse, plain) and amortised over the schedule (factors every 10 steps, decompositions every 100), and the
   K-FAC memory of each rank by category. Three schemes on the same placement (:data:`SCHEMES`): ours (factors
   reduced into their owner, symmetric matrices as triangles: the library's defaults), KAISA as kfac-pytorch
   ships it (``factor_comm="allreduce"`` of full square factors to every rank: its ``symmetry_aware=False``
   default) and KAISA with triangles (isolates what reducing into the owner saves). Mean and max over ranks.
2. Real runs. The same code path on real processes: a ResNet-50 at width 1/8 (the same 54 layers, small enough
   for gloo on 2 cores) trains ``--check-steps`` steps on W = 2 and 4 gloo processes (1 thread each) for every
   fraction and scheme, with the same (10, 100) schedule. Every step's ``comm_stats()`` difference and the final
   ``memory_usage()`` of every rank must *equal* the planner's prediction for that model (the per-step bytes of
   the step's kind, the memory by category); the JSON stores every mismatch (none is expected). With
   ``--check-steps 100`` (``--full``) the run is one whole period, so the recorded totals equal 100 times the
   planner's amortised bytes as well. W = 4 on 2 cores is oversubscribed: fine for bytes, not for time.
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_dist import KFACPreconditioner, costs
from kfac_dist.app.bench.common import BenchRun, positive_int, write_outputs
from kfac_dist.app.bench.gloo_runs import BENCH_LIMITS, ProxySpec, average_gradients
from kfac_dist.app.processes import run_gloo
from kfac_dist.comm import TorchDistCommunicator
from kfac_dist.placement import Plan, num_grad_workers, resolve_grad_worker_fraction
from kfac_dist.planner import STEP_KINDS, PlanReport, plan_model

__all__ = [
    "FRACTIONS",
    "FREQ",
    "PROXY",
    "SCHEMES",
    "add_arguments",
    "check_against_planner",
    "main",
    "planner_sweep",
    "real_check",
    "run",
    "summarize",
]

Log = Callable[[str], None]
#: Factor and inverse periods of every number here.
FREQ = (10, 100)
#: Grad-worker fractions, by the library's names (mem-opt is 1/W).
FRACTIONS = ("mem-opt", "hybrid-opt", "comm-opt")
FRACTION_TITLES = {"mem-opt": "1/W", "hybrid-opt": "0.5", "comm-opt": "1"}
#: Factor-exchange schemes compared, as preconditioner options.
SCHEMES: dict[str, dict[str, Any]] = {
    "ours": {"factor_comm": "owner", "symmetric_comm": True},
    "kaisa": {"factor_comm": "allreduce", "symmetric_comm": False},
    "kaisa_packed": {"factor_comm": "allreduce", "symmetric_comm": True},
}
SCHEME_TITLES = {
    "ours": "ours (reduce to owner, triangles)",
    "kaisa": "KAISA (allreduce, full squares)",
    "kaisa_packed": "KAISA + triangles",
}
#: The real-run model: ResNet-50's 54 layers at 1/8 width (125 classes) on 32x32 inputs.
PROXY = ProxySpec()
PLANNED_MODEL = "resnet50"
WORLD_SIZES = (8, 64, 256, 1024)


def step_kind(step: int, freq: tuple[int, int] = FREQ) -> str:
    """The :data:`~kfac_dist.planner.STEP_KINDS` kind of step ``step`` under ``(factor, inverse)`` periods."""
    flags = (step % freq[0] == 0, step % freq[1] == 0)
    return next(kind for kind, kind_flags in STEP_KINDS.items() if kind_flags == flags)


def _traffic(per_category: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(v["sent"] + v["received"] for v in per_category.values()))


def _mean_max(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "max": max(values)}


def summarize(report: PlanReport) -> dict[str, Any]:
    """Mean and max over ranks of the traffic (sent + received) per step kind and amortised, and of memory."""
    counts = report.options.steps_per_period()
    per_kind: dict[str, Mapping[int, Mapping[str, Mapping[str, float]]]] = {
        kind: report.step_bytes[kind] for kind in STEP_KINDS if counts[kind]
    }
    per_kind["amortised"] = report.amortised
    traffic: dict[str, Any] = {}
    for kind, per_rank in per_kind.items():
        ranks = list(per_rank.values())
        entry = _mean_max([_traffic(r) for r in ranks])
        entry["max_sent"] = max(sum(c["sent"] for c in r.values()) for r in ranks)
        entry["max_received"] = max(sum(c["received"] for c in r.values()) for r in ranks)
        entry["by_category"] = {
            c: _mean_max([r[c]["sent"] + r[c]["received"] for r in ranks]) for c in costs.CATEGORIES
        }
        traffic[kind] = entry
    totals = [sum(m.values()) for m in report.memory.values()]
    memory = _mean_max([float(t) for t in totals])
    memory["by_category_max"] = {c: max(m[c] for m in report.memory.values()) for c in costs.MEMORY_CATEGORIES}
    busiest = max(report.memory, key=lambda r: sum(report.memory[r].values()))
    memory["busiest_rank"] = dict(report.memory[busiest])
    return {
        "grad_workers": report.plan.grad_workers,
        "bytes": traffic,
        "memory": memory,
        "load_imbalance": report.load.imbalance,
    }


def planner_sweep(
    model: str | nn.Module, world_sizes: Sequence[int], freq: tuple[int, int] = FREQ, log: Log = print
) -> list[dict[str, Any]]:
    """:func:`summarize` of ``plan_model`` for every W, fraction and scheme (rows in that order)."""
    rows = []
    for world_size in world_sizes:
        for fraction in FRACTIONS:
            started = time.perf_counter()
            row: dict[str, Any] = {"world_size": world_size, "fraction": fraction, "schemes": {}}
            for scheme, options in SCHEMES.items():
                report = plan_model(
                    model,
                    world_size,
                    grad_worker_fraction=fraction,
                    factor_update_steps=freq[0],
                    inv_update_steps=freq[1],
                    **options,
                )
                row["schemes"][scheme] = summarize(report)
            row["grad_workers"] = row["schemes"]["ours"]["grad_workers"]
            rows.append(row)
            log(f"  planned W={world_size} f={FRACTION_TITLES[fraction]} ({time.perf_counter() - started:.1f} s)")
    return rows


# ------------------------------------------------------------------------------------------------ real runs
def real_cases(world_size: int) -> list[dict[str, Any]]:
    """Every (fraction, scheme) of the real check at `world_size`; fractions giving the same g run once."""
    cases, seen = [], set()
    for fraction in FRACTIONS:
        workers = num_grad_workers(resolve_grad_worker_fraction(fraction, world_size), world_size)
        if workers in seen:
            continue
        seen.add(workers)
        cases += [{"fraction": fraction, "scheme": scheme} for scheme in SCHEMES]
    return cases


def train_and_record(
    rank: int,
    world_size: int,
    proxy: ProxySpec,
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
            model,
            lr=0.01,
            factor_update_steps=freq[0],
            inv_update_steps=freq[1],
            grad_worker_fraction=case["fraction"],
            communicator=TorchDistCommunicator(),
            **SCHEMES[case["scheme"]],
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        per_step = []
        for step in range(steps):
            generator = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(batch, *proxy.input_shape, generator=generator)
            y = torch.randint(0, proxy.num_classes, (batch,), generator=generator)
            before = pre.comm_stats()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            average_gradients(model)  # the user's gradient averaging (default group): not K-FAC's bytes
            pre.step()
            optimizer.step()
            after = pre.comm_stats()
            per_step.append({c: _delta(before, after, c) for c in sorted(set(after) | set(costs.CATEGORIES))})
        out.append({"plan": pre.plan().to_dict(), "steps": per_step, "memory": pre.memory_usage()})
        pre.remove_hooks()
    return out


def _delta(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]], category: str) -> Any:
    zero = {"sent": 0, "received": 0}
    b, a = before.get(category, zero), after.get(category, zero)
    return {d: a[d] - b[d] for d in ("sent", "received")}


def check_against_planner(
    recorded: list[dict[str, Any]], report: PlanReport, freq: tuple[int, int] = FREQ
) -> dict[str, Any]:
    """Compare what every rank recorded with the planner: plan, memory, and every step's bytes, exactly.

    Returns:
        ``{"equal": bool, "mismatches": [...], "compared": count of compared integers, ...}``.
    """
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
                for direction in ("sent", "received"):
                    compared += 1
                    if got[category][direction] != expected[category][direction]:
                        mismatches.append(
                            f"rank {rank} step {step} {category} {direction}: recorded {got[category][direction]}, "
                            f"planner {expected[category][direction]}"
                        )
    steps = len(recorded[0]["steps"])
    totals = [_traffic(_sum_steps(rec["steps"])) for rec in recorded]
    result: dict[str, Any] = {"equal": not mismatches, "mismatches": mismatches[:20], "compared": compared}
    result |= {"steps": steps, "kinds": sorted({step_kind(k, freq) for k in range(steps)}), "traffic": totals}
    if steps % report.options.period == 0:  # whole periods: the totals are the amortised bytes times the steps
        amortised = [_traffic(report.amortised[r]) * steps for r in range(len(recorded))]
        pairs = zip(totals, amortised, strict=True)
        result["amortised_equal"] = all(abs(t - a) <= 1e-6 * max(1.0, a) for t, a in pairs)
    return result


def _sum_steps(steps: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {c: {d: sum(s[c][d] for s in steps) for d in ("sent", "received")} for c in costs.CATEGORIES}


def real_check(
    world_sizes: Sequence[int],
    steps: int,
    batch: int = 4,
    proxy: ProxySpec = PROXY,
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
            options = SCHEMES[case["scheme"]]
            report = plan_model(
                model,
                world_size,
                grad_worker_fraction=case["fraction"],
                factor_update_steps=freq[0],
                inv_update_steps=freq[1],
                **options,
            )
            check = check_against_planner([per_rank[index] for per_rank in recorded], report, freq)
            memory = [sum(per_rank[index]["memory"].values()) for per_rank in recorded]
            rows.append({"world_size": world_size, **case, "grad_workers": report.plan.grad_workers, **check})
            rows[-1]["memory"] = memory
        equal = sum(r["equal"] for r in rows if r["world_size"] == world_size)
        log(f"  real gloo runs W={world_size}: {len(cases)} cases, {equal} equal to the planner ({seconds:.0f} s)")
    return rows


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench comm``."""
    parser.add_argument("--full", action="store_true", help="the docs/ run: --check-steps 100 (one whole period)")
    parser.add_argument("--world-sizes", nargs="+", type=positive_int, default=list(WORLD_SIZES), help="planned W")
    parser.add_argument("--check-world-sizes", nargs="*", type=positive_int, default=[2, 4], help="real gloo runs at W")
    parser.add_argument(
        "--check-steps", type=positive_int, default=None, help="steps per real run (default 11; --full 100)"
    )
    parser.add_argument("--check-batch", type=positive_int, default=4, help="per-rank batch of the real runs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/comm"), help="output path prefix")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib not needed)")


def command_line(args: argparse.Namespace) -> str:
    """The ``kfac-dist`` command that reproduces a run (options at their defaults left out)."""
    words = ["kfac-dist", "bench", "comm"] + (["--full"] if args.full else [])
    if list(args.world_sizes) != list(WORLD_SIZES):
        words += ["--world-sizes", *map(str, args.world_sizes)]
    if list(args.check_world_sizes) != [2, 4]:
        words += ["--check-world-sizes", *map(str, args.check_world_sizes)]
    if args.check_steps is not None:
        words += ["--check-steps", str(args.check_steps)]
    if args.check_batch != 4:
        words += ["--check-batch", str(args.check_batch)]
    return shlex.join([*words, "--out", str(args.out)] + (["--no-plot"] if args.no_plot else []))


def run(args: argparse.Namespace) -> int:
    """Run ``kfac-dist bench comm``; write JSON, Markdown and PNG at ``--out``. Exit code 1 if a check failed."""
    from kfac_dist.app.bench import comm_report

    log: Log = lambda line: print(line, flush=True)  # noqa: E731
    steps = args.check_steps or (FREQ[1] if args.full else FREQ[0] + 1)
    record = BenchRun(command_line(args), threads=1)
    log(f"planner: {PLANNED_MODEL} at W = {', '.join(map(str, args.world_sizes))}")
    planned = planner_sweep(PLANNED_MODEL, args.world_sizes, log=log)
    log(f"real gloo runs: ResNet-50 width 1/8, {steps} steps, batch {args.check_batch} per rank")
    checks = real_check(args.check_world_sizes, steps, args.check_batch, log=log)
    results: dict[str, Any] = {"planned_model": PLANNED_MODEL, "freq": list(FREQ), "planner": planned}
    results["check"] = {"proxy": PROXY.describe()}
    results["check"] |= {"steps": steps, "batch": args.check_batch, "cases": checks}
    results["meta"] = record.meta()
    write_outputs(args.out, results, comm_report.markdown, None if args.no_plot else comm_report.plot)
    return 0 if all(case["equal"] for case in checks) else 1


def main(argv: list[str] | None = None) -> int:
    """``python scripts/bench_comm.py``: the same options as ``kfac-dist bench comm``."""
    parser = argparse.ArgumentParser(prog="bench_comm", description="Bytes and memory per rank, ours vs KAISA.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
