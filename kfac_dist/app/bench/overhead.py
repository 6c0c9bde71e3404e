"""Overhead benchmark: time per training step of SGD-momentum + K-FAC against SGD-momentum on the same model.

Protocol (``kfac-dist bench overhead``; docs/BENCHMARKS.md section 1 quotes the ``--full`` run):

1. One process, ``torch.set_num_threads(1)``. For each model and (factor, inverse) frequency ``(f, p)`` there is
   one *arm* per optimizer: SGD-momentum, and SGD-momentum + K-FAC for each compute method. Every arm starts from
   the same initial weights (one seeded build, copied) and sees the same batch sequence (a fixed pool of
   synthetic batches; step time does not depend on the values).
2. Warm-up: every arm trains ``warmup_steps`` untimed steps. A K-FAC arm is then rebuilt from its
   ``state_dict()`` with its step counter moved to the next multiple of ``p``, so every timed block starts on an
   inverse step.
3. Blocks: a block is a whole number of inverse periods (``p`` steps, at least ``min_block_steps``), so it holds
   the same mix of plain, factor and inverse steps as a long run. Rounds run one block of every arm, in an order
   that rotates each round, so drift and background load hit every arm alike. The step time of a block is its
   wall time over its steps; an arm's step time is the median over rounds, and K-FAC's ratio is the ratio of
   medians (the per-round ratios are stored too). Each block also records its process CPU time: with one
   thread, CPU time < wall time means the process waited for a core (other load on the machine). A round in
   which any block was busy less than ``min_busy`` of its wall time is run again (at most ``max_retries``
   times; the JSON counts the discarded rounds), and the ratio of median CPU times is reported beside the
   wall-clock ratio as a load-independent check.
4. Phase breakdown: after the rounds, every K-FAC arm is rebuilt with ``profile=True`` (same state) and runs
   separate profiled blocks (a round with an SGD block beside them); the headline blocks run unprofiled.
   Forward and backward are timed around ``model(x)`` + loss and ``loss.backward()``, minus the factor
   computation the hooks do inside them (``phase_times()["factor_computation"]``, read before and after the
   forward); the K-FAC phases come from ``phase_times()``; "optimizer" is ``zero_grad`` + ``optimizer.step()``.
   The named phases must add up to the block's measured step time within 10%; the remainder (Python between the
   timed regions, the parts of ``pre.step()`` no phase covers) is reported and folded into "other" = optimizer
   + remainder.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kfac_dist.app.bench.common import BenchRun, positive_int, write_outputs
from kfac_dist.app.bench.overhead_runs import (
    MODELS,
    PHASES,
    TOLERANCE,
    Arm,
    BlockTimes,
    ModelSpec,
    block_steps,
    breakdown,
    coarse,
    median_dict,
)
from kfac_dist.options import COMPUTE_METHODS

__all__ = [
    "FULL_ROUNDS",
    "MODELS",
    "PHASES",
    "TOLERANCE",
    "ModelSpec",
    "Settings",
    "add_arguments",
    "main",
    "run",
    "run_benchmark",
]

Log = Callable[[str], None]
FREQS: list[tuple[int, int]] = [(1, 1), (10, 100), (50, 500)]
QUICK_FREQS: list[tuple[int, int]] = [(1, 1), (10, 100)]
#: Rounds per frequency of the ``--full`` run.
FULL_ROUNDS: dict[tuple[int, int], int] = {(1, 1): 5, (10, 100): 5, (50, 500): 3}


@dataclass
class Settings:
    """Everything a benchmark run depends on (stored in the JSON)."""

    models: list[ModelSpec]
    freqs: list[tuple[int, int]]
    methods: list[str]
    rounds: dict[tuple[int, int], int]
    min_block_steps: int = 20
    warmup_steps: int = 10
    profile_blocks: int = 1
    batch_pool: int = 8
    min_busy: float = 0.9
    max_retries: int = 2
    lr: float = 0.01
    seed: int = 0
    threads: int = 1


def _round(
    arms: list[Arm], batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, settings: Settings
) -> tuple[dict[str, BlockTimes], int]:
    """One block of every arm, in the given order; redone while a block was contended (cpu / wall < min_busy).

    With one thread, a block's process CPU time falls short of its wall time only when the process waited for a
    core (other processes on the machine). Such a round is run again, up to ``max_retries`` times.

    Returns:
        The kept round and the number of rounds discarded before it.
    """
    for attempt in range(settings.max_retries + 1):
        round_ = {arm.name: arm.run(batches, steps) for arm in arms}
        if min(b.busy for b in round_.values()) >= settings.min_busy or attempt == settings.max_retries:
            return round_, attempt
    raise AssertionError("unreachable")


def _batches(spec: ModelSpec, settings: Settings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed pool of synthetic batches every arm cycles through."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    return [
        (
            torch.randn(spec.batch, *spec.input_shape, generator=generator),
            torch.randint(0, spec.num_classes, (spec.batch,), generator=generator),
        )
        for _ in range(settings.batch_pool)
    ]


def measure(spec: ModelSpec, freq: tuple[int, int], settings: Settings, log: Log = print) -> dict[str, Any]:
    """All arms of one model at one frequency, interleaved; medians, ratios and the phase breakdown."""
    torch.manual_seed(settings.seed)
    initial = spec.build()
    batches = _batches(spec, settings)
    arms = [Arm("sgd", copy.deepcopy(initial), settings.lr, None, freq)]
    arms += [Arm(m, copy.deepcopy(initial), settings.lr, m, freq) for m in settings.methods]
    for arm in arms:
        arm.run(batches, settings.warmup_steps)
        arm.rebuild(profile=False)
    steps = block_steps(freq, settings.min_block_steps)
    rounds = settings.rounds.get(freq, 1)
    blocks: dict[str, list[BlockTimes]] = {arm.name: [] for arm in arms}
    discarded = 0
    for r in range(rounds):
        kept, redone = _round(arms[r % len(arms) :] + arms[: r % len(arms)], batches, steps, settings)
        discarded += redone
        for name, block in kept.items():
            blocks[name].append(block)
        log(
            f"  {spec.builder} {freq} round {r + 1}/{rounds} ({redone} redone): "
            + ", ".join(f"{n} {b.per_step_ms(b.wall):.2f} ms (busy {b.busy:.2f})" for n, b in kept.items())
        )
    profiled: dict[str, list[BlockTimes]] = {arm.name: [] for arm in arms}
    for arm in arms[1:]:
        arm.rebuild(profile=True)
    for _ in range(settings.profile_blocks):  # with an SGD block beside them, as a reference taken at the same time
        kept, redone = _round(arms, batches, steps, settings)
        discarded += redone
        for name, block in kept.items():
            profiled[name].append(block)
    sgd_ms = [b.per_step_ms(b.wall) for b in blocks["sgd"]]
    sgd_cpu = [b.per_step_ms(b.cpu) for b in blocks["sgd"]]
    result: dict[str, Any] = {
        "model": spec.title,
        "freq": list(freq),
        "block_steps": steps,
        "rounds": rounds,
        "discarded_rounds": discarded,
        "min_busy": min(b.busy for bs in (*blocks.values(), *profiled.values()) for b in bs),
        "sgd": {
            "step_ms": sgd_ms,
            "median_ms": statistics.median(sgd_ms),
            "cpu_ms": sgd_cpu,
            "median_cpu_ms": statistics.median(sgd_cpu),
            "final_loss": math.nan,
        },
        "sgd_coarse_ms": median_dict([coarse(b) for b in blocks["sgd"]]),
        "sgd_beside_profiled_ms": statistics.median(b.per_step_ms(b.wall) for b in profiled["sgd"]),
        "methods": {},
    }
    result["sgd_phases_ms"] = _sgd_phases(result["sgd_coarse_ms"], result["sgd"]["median_ms"])
    for arm in arms[1:]:
        assert arm.pre is not None
        kfac_ms = [b.per_step_ms(b.wall) for b in blocks[arm.name]]
        kfac_cpu = [b.per_step_ms(b.cpu) for b in blocks[arm.name]]
        parts = [breakdown(b) for b in profiled[arm.name]]
        result["methods"][arm.name] = {
            "step_ms": kfac_ms,
            "median_ms": statistics.median(kfac_ms),
            "ratio": statistics.median(kfac_ms) / result["sgd"]["median_ms"],
            "ratio_per_round": [k / s for k, s in zip(kfac_ms, sgd_ms, strict=True)],
            "cpu_ms": kfac_cpu,
            "median_cpu_ms": statistics.median(kfac_cpu),
            "cpu_ratio": statistics.median(kfac_cpu) / statistics.median(sgd_cpu),
            "coarse_ms": median_dict([coarse(b) for b in blocks[arm.name]]),
            "profiled": parts[0] if len(parts) == 1 else _median_profile(parts),
            "health": arm.pre.health(),
            "final_loss": arm.last_loss,
        }
    result["sgd"]["final_loss"] = arms[0].last_loss
    return result


def _sgd_phases(coarse_ms: dict[str, float], step_ms: float) -> dict[str, float]:
    """SGD's step in the breakdown's phases (no K-FAC phases; other = optimizer + remainder)."""
    phases = dict.fromkeys(PHASES, 0.0)
    phases["forward"], phases["backward"] = coarse_ms["forward"], coarse_ms["backward"]
    phases["other"] = step_ms - phases["forward"] - phases["backward"]
    return phases


def _median_profile(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The profiled block with the median step time (its phases stay consistent with its own step)."""
    ordered = sorted(parts, key=lambda p: p["step_ms"])
    return {**ordered[len(ordered) // 2], "profiled_blocks": len(parts)}


def run_benchmark(settings: Settings, log: Log = print) -> dict[str, Any]:
    """Every model x frequency; returns the results dict (JSON-ready, without ``meta``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        results = []
        for spec in settings.models:
            for freq in settings.freqs:
                log(f"{spec.title}: frequencies {freq}")
                results.append(measure(spec, freq, settings, log))
    finally:
        torch.set_num_threads(threads)
    return {
        "results": results,
        "tolerance": TOLERANCE,
        "min_busy": settings.min_busy,
        "max_retries": settings.max_retries,
    }


def _freq(text: str) -> tuple[int, int]:
    try:
        f, p = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FACTOR,INVERSE (e.g. 10,100), got {text!r}") from None
    if f < 1 or p < 1:
        raise argparse.ArgumentTypeError(f"frequencies must be >= 1, got {text!r}")
    return f, p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfac-dist bench overhead``."""
    parser.add_argument("--full", action="store_true", help="all frequencies, 5/5/3 rounds (the docs/ run)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument(
        "--freqs",
        nargs="+",
        type=_freq,
        default=None,
        help="FACTOR,INVERSE pairs (default 1,1 10,100; --full adds 50,500)",
    )
    parser.add_argument("--methods", nargs="+", choices=COMPUTE_METHODS, default=list(COMPUTE_METHODS))
    parser.add_argument(
        "--rounds", type=positive_int, default=None, help="rounds per frequency (default 2; --full 5/5/3)"
    )
    parser.add_argument("--min-block-steps", type=positive_int, default=20, help="steps per block at least")
    parser.add_argument("--warmup-steps", type=positive_int, default=10, help="untimed steps per arm")
    parser.add_argument("--profile-blocks", type=positive_int, default=1, help="profiled blocks per K-FAC arm")
    parser.add_argument("--max-retries", type=int, default=2, help="reruns of a round that was contended")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead"), help="output path prefix")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib not needed)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings of a parsed command line."""
    freqs = args.freqs or (FREQS if args.full else QUICK_FREQS)
    if args.rounds is not None:
        rounds = dict.fromkeys(freqs, args.rounds)
    else:
        rounds = {freq: FULL_ROUNDS.get(freq, 2) if args.full else 2 for freq in freqs}
    return Settings(
        models=[MODELS[name] for name in args.models],
        freqs=list(freqs),
        methods=list(args.methods),
        rounds=rounds,
        min_block_steps=args.min_block_steps,
        warmup_steps=args.warmup_steps,
        profile_blocks=args.profile_blocks,
        max_retries=args.max_retries,
    )


def command_line(args: argparse.Namespace) -> str:
    """The ``kfac-dist`` command that reproduces a run (options at their defaults left out)."""
    words = ["kfac-dist", "bench", "overhead"] + (["--full"] if args.full else [])
    if list(args.models) != list(MODELS):
        words += ["--models", *args.models]
    if args.freqs:
        words += ["--freqs", *(f"{f},{p}" for f, p in args.freqs)]
    if list(args.methods) != list(COMPUTE_METHODS):
        words += ["--methods", *args.methods]
    defaults = {"rounds": None, "min_block_steps": 20, "warmup_steps": 10, "profile_blocks": 1, "max_retries": 2}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value is not None and value != default:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join([*words, "--out", str(args.out)] + (["--no-plot"] if args.no_plot else []))


def jsonable(settings: Settings) -> dict[str, Any]:
    """Settings as JSON (frequency keys as "f,p")."""
    data = asdict(settings)
    data["rounds"] = {f"{f},{p}": n for (f, p), n in settings.rounds.items()}
    return data


def run(args: argparse.Namespace) -> int:
    """Run ``kfac-dist bench overhead`` on parsed arguments; write JSON, Markdown and PNG at ``--out``."""
    from kfac_dist.app.bench import overhead_report

    config = settings_from_args(args)
    record = BenchRun(command_line(args), config.threads)
    results = run_benchmark(config, log=lambda line: print(line, flush=True))
    results["flops"] = overhead_report.flop_rows(config.freqs)
    results["meta"] = record.meta(jsonable(config))
    write_outputs(args.out, results, overhead_report.markdown, None if args.no_plot else overhead_report.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python scripts/bench_overhead.py``: the same options as ``kfac-dist bench overhead``."""
    parser = argparse.ArgumentParser(prog="bench_overhead", description="Per-step time of K-FAC vs SGD.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
