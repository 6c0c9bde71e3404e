"""Overhead benchmark: time per training step of SGD-momentum + K-FAC against SGD-momentum on the same model.

Protocol: docs/BENCHMARKS.md section 1 (``--device cpu``, the default); on a GPU (``--device cuda``) the device
protocol of :mod:`kfac_dist.app.bench.overhead_device` (docs/BENCHMARKS.md section 5). Both report the ATen
operators per kind of step of the model measured (:func:`kfac_dist.app.bench.operators.count_kinds`, on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kfac_dist.app.bench.arms import Arm, Block
from kfac_dist.app.bench.common import Log, ModelSpec, positive_int
from kfac_dist.app.bench.operators import count_kinds
from kfac_dist.app.bench.overhead_device import BATCH_SIZES, DTYPES, DeviceSettings, run_device
from kfac_dist.app.bench.overhead_device import FREQS as DEVICE_FREQS
from kfac_dist.app.bench.overhead_flops import ratio_table
from kfac_dist.app.bench.overhead_kaisa import KaisaUnavailable, require_kaisa
from kfac_dist.app.bench.overhead_runs import (
    MODELS,
    PHASES,
    TOLERANCE,
    Workload,
    block_steps,
    breakdown,
    coarse,
    median_dict,
)
from kfac_dist.methods import COMPUTE_METHODS
from kfac_dist.options import KFACOptions
from kfac_dist.precision import PRECISIONS

__all__ = ["FULL", "FULL_ROUNDS", "Settings", "add_arguments", "operator_counts", "run", "run_benchmark"]

FULL = "all frequencies, 5/5/3 rounds (the docs/ run)"
FREQS: list[tuple[int, int]] = [(1, 1), (10, 100), (50, 500)]
QUICK_FREQS: list[tuple[int, int]] = [(1, 1), (10, 100)]
#: Rounds per frequency of the ``--full`` run.
FULL_ROUNDS: dict[tuple[int, int], int] = {(1, 1): 5, (10, 100): 5, (50, 500): 3}
#: Rounds of the device protocol (quick, ``--full``).
DEVICE_ROUNDS = (3, 5)
#: Examples per step of the operator count (the count does not depend on the batch).
OPERATOR_BATCH = 4


@dataclass
class Settings:
    """Everything a benchmark run depends on (stored in the JSON)."""

    models: list[Workload]
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


def _round(arms: list[Arm], steps: int, settings: Settings) -> tuple[dict[str, Block], int]:
    """One block of every arm, in the given order; redone while a block was contended (cpu / wall < min_busy).

    With one thread, a block's process CPU time falls short of its wall time only when the process waited for a
    core (other processes on the machine). Such a round is run again, up to ``max_retries`` times.

    Returns:
        The kept round and the number of rounds discarded before it.
    """
    for attempt in range(settings.max_retries + 1):
        round_ = {arm.name: arm.run(steps) for arm in arms}
        if min(b.busy for b in round_.values()) >= settings.min_busy or attempt == settings.max_retries:
            return round_, attempt
    raise AssertionError("unreachable")


def measure(spec: Workload, freq: tuple[int, int], settings: Settings, log: Log = print) -> dict[str, Any]:
    """All arms of one model at one frequency, interleaved; medians, ratios and the phase breakdown."""
    initial = spec.model.build(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    batches = [spec.model.batch(spec.batch, generator) for _ in range(settings.batch_pool)]  # every arm cycles them
    arms = [Arm("sgd", copy.deepcopy(initial), batches, None, settings.lr)]
    for method in settings.methods:
        kfac = KFACOptions(factor_update_steps=freq[0], inv_update_steps=freq[1], compute_method=method)
        arms.append(Arm(method, copy.deepcopy(initial), batches, kfac, settings.lr))
    for arm in arms:
        arm.run(settings.warmup_steps)
        arm.rebuild(profile=False, align=True)
    steps = block_steps(freq, settings.min_block_steps)
    rounds = settings.rounds.get(freq, 1)
    blocks: dict[str, list[Block]] = {arm.name: [] for arm in arms}
    discarded = 0
    for r in range(rounds):
        kept, redone = _round(arms[r % len(arms) :] + arms[: r % len(arms)], steps, settings)
        discarded += redone
        for name, block in kept.items():
            blocks[name].append(block)
        log(
            f"  {spec.model.builder} {freq} round {r + 1}/{rounds} ({redone} redone): "
            + ", ".join(f"{n} {b.per_step_ms(b.wall):.2f} ms (busy {b.busy:.2f})" for n, b in kept.items())
        )
    profiled: dict[str, list[Block]] = {arm.name: [] for arm in arms}
    for arm in arms[1:]:
        arm.rebuild(profile=True, align=True)
    for _ in range(settings.profile_blocks):  # with an SGD block beside them, as a reference taken at the same time
        kept, redone = _round(arms, steps, settings)
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
    device = parser.add_argument_group("device", "--device cuda: ResNet-50 at 224x224 (docs/BENCHMARKS.md section 5)")
    device.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the protocol's device (default cpu)")
    help_batch = f"cuda: examples per step, one run each (default {' '.join(map(str, BATCH_SIZES))})"
    device.add_argument("--batch-sizes", nargs="+", type=positive_int, help=help_batch)
    help_dtype = "cuda: fp32, and bf16 autocast around forward + loss (default both)"
    device.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help=help_dtype)
    help_precisions = "cuda: kfac-dist arms per K-FAC precision (highest, tf32, bf16; default highest)"
    device.add_argument("--precisions", nargs="+", choices=PRECISIONS, help=help_precisions)
    help_kaisa = "cuda: KAISA arms beside (needs kfac-pytorch's `kfac` importable, e.g. on PYTHONPATH)"
    device.add_argument("--compare-kaisa", action="store_true", help=help_kaisa)
    help_models = f"cpu: models to run (default {' '.join(MODELS)})"
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), help=help_models)
    help_freqs = "FACTOR,INVERSE pairs (cpu default 1,1 10,100, --full adds 50,500; cuda default 10,100)"
    parser.add_argument("--freqs", nargs="+", type=_freq, help=help_freqs)
    parser.add_argument("--methods", nargs="+", choices=COMPUTE_METHODS, default=list(COMPUTE_METHODS))
    quick, full = DEVICE_ROUNDS
    help_rounds = f"rounds per frequency (cpu default 2, --full 5/5/3; cuda {quick}, --full {full})"
    parser.add_argument("--rounds", type=positive_int, help=help_rounds)
    parser.add_argument("--min-block-steps", type=positive_int, default=20, help="steps per block at least")
    parser.add_argument("--warmup-steps", type=positive_int, default=10, help="untimed steps per arm")
    parser.add_argument("--profile-blocks", type=positive_int, default=1, help="profiled blocks per K-FAC arm")
    parser.add_argument("--max-retries", type=int, default=2, help="cpu: reruns of a round that was contended")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings of a parsed command line."""
    freqs = args.freqs or (FREQS if args.full else QUICK_FREQS)
    if args.rounds is not None:
        rounds = dict.fromkeys(freqs, args.rounds)
    else:
        rounds = {freq: FULL_ROUNDS.get(freq, 2) if args.full else 2 for freq in freqs}
    return Settings(
        models=[MODELS[name] for name in args.models or MODELS],
        freqs=list(freqs),
        methods=list(args.methods),
        rounds=rounds,
        min_block_steps=args.min_block_steps,
        warmup_steps=args.warmup_steps,
        profile_blocks=args.profile_blocks,
        max_retries=args.max_retries,
    )


def jsonable(settings: Settings) -> dict[str, Any]:
    """Settings as JSON (frequency keys as "f,p")."""
    data = asdict(settings) | {"models": [m.describe() for m in settings.models]}
    data["rounds"] = {f"{f},{p}": n for (f, p), n in settings.rounds.items()}
    return data


def device_settings(args: argparse.Namespace) -> DeviceSettings:
    """The device protocol's settings of a parsed ``--device cuda`` command line.

    Raises:
        SystemExit: If an option does not apply, CUDA is not available, or ``--compare-kaisa`` cannot import KAISA.
    """
    if args.models is not None:
        raise _error("--models: only with --device cpu (--device cuda measures ResNet-50 at 224x224)")
    if not torch.cuda.is_available():
        raise _error(
            f"--device {args.device}: torch.cuda.is_available() is False (no GPU here, or a CPU-only torch build); "
            "run it on a GPU machine, or use --device cpu"
        )
    if args.compare_kaisa:
        try:
            require_kaisa()
        except KaisaUnavailable as error:
            raise _error(str(error)) from None
    return DeviceSettings(
        device=args.device,
        batch_sizes=list(args.batch_sizes or BATCH_SIZES),
        dtypes=list(args.dtype or DTYPES),
        methods=list(args.methods),
        precisions=list(args.precisions or ["highest"]),
        freqs=list(args.freqs or DEVICE_FREQS),
        rounds=args.rounds or DEVICE_ROUNDS[1 if args.full else 0],
        min_block_steps=args.min_block_steps,
        warmup_steps=args.warmup_steps,
        profile_blocks=args.profile_blocks,
        compare_kaisa=args.compare_kaisa,
    )


def _error(message: str) -> SystemExit:
    """A one-line error of this benchmark's command line (exit code 1)."""
    return SystemExit(f"kfac-dist bench overhead: error: {message}")


def operator_counts(models: dict[str, ModelSpec], methods: list[str], log: Log = print) -> list[dict[str, Any]]:
    """ATen operators per kind of step and method of each model (title -> the model counted, on the CPU)."""
    counts = []
    for title, spec in models.items():
        log(f"{title}: ATen operators per kind of step ({spec.builder} {spec.kwargs} on {spec.input_shape})")
        counted = count_kinds(spec, OPERATOR_BATCH, methods, log=lambda line: log(f"  {line}"))
        counts.append({"model": title, "counted": spec.describe(), "batch": OPERATOR_BATCH, **counted})
    return counts


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the benchmark of parsed options; the results (with the FLOP table or the device's) and the settings."""
    if args.device != "cpu":
        device = device_settings(args)
        results = run_device(device, log)
        title = f"{device.model.builder} {device.model.kwargs}, input {list(device.model.input_shape)}"
        results["operators"] = operator_counts({title: device.count_model}, device.methods, log)
        return results, device.jsonable()
    cuda_only = {
        "--batch-sizes": args.batch_sizes,
        "--dtype": args.dtype,
        "--precisions": args.precisions,
        "--compare-kaisa": args.compare_kaisa,
    }
    if any(cuda_only.values()):
        given = ", ".join(flag for flag, value in cuda_only.items() if value)
        raise _error(f"{given}: only with --device cuda (the CPU protocol runs --models at their own batch, in fp32)")
    config = settings_from_args(args)
    results = run_benchmark(config, log)
    results["flops"] = ratio_table(config.freqs)  # ResNet-50 at 224 / batch 32 vs the proxy
    results["operators"] = operator_counts({m.title: m.model for m in config.models}, config.methods, log)
    return results, jsonable(config)
