"""The overhead benchmark's device protocol (``--device cuda``): ResNet-50 at 224x224, fp32 and bf16, KAISA beside.

Protocol (docs/BENCHMARKS.md section 5): for every batch size x dtype x frequency pair, every arm (SGD-momentum,
SGD + kfac-dist with each compute method, with ``--compare-kaisa`` SGD + KAISA with each it has) starts from the same
weights and cycles through the same batches (already on the device); every arm first runs whole inverse periods
untimed, then rounds of one block of every arm in an order that rotates each round. A block is a whole number of
inverse periods timed by the device's :class:`~kfac_dist.app.bench.overhead_clock.Clock` as one interval: on CUDA
two events around the block and nothing that waits for the GPU between them. After the rounds, one profiled block
per arm synchronises the device at every region boundary (zero_grad, forward, backward, ``pre.step()``,
optimizer step), and kfac-dist's own ``profile=True`` synchronises it around every K-FAC phase: its phases add up
to its measured step as on the CPU (:func:`~kfac_dist.app.bench.overhead_runs.breakdown`), but the syncs remove
the overlap the unprofiled blocks have, so the profiled step is longer.

bf16 wraps the forward pass and the loss in ``torch.autocast(device_type, dtype=torch.bfloat16)``; the weights,
gradients, optimizers and preconditioners stay as they are (float32).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from kfac_dist.app.bench.arms import REGIONS, Arm, Block
from kfac_dist.app.bench.common import PROXY, Log, ModelSpec
from kfac_dist.app.bench.overhead_clock import Clock, clock_for
from kfac_dist.app.bench.overhead_kaisa import KAISA_METHODS, kaisa_preconditioner
from kfac_dist.app.bench.overhead_runs import TOLERANCE, block_steps, breakdown, coarse
from kfac_dist.methods import COMPUTE_METHODS
from kfac_dist.options import KFACOptions

__all__ = [
    "BATCH_SIZES",
    "DTYPES",
    "FREQS",
    "RESNET50",
    "DeviceArm",
    "DeviceSettings",
    "build_arms",
    "measure",
    "run_device",
]

#: The model of the device protocol: ResNet-50 v1.5 at 224x224, 1000 classes.
RESNET50 = ModelSpec("resnet50", {"num_classes": 1000}, (3, 224, 224))
#: ``--dtype`` -> the autocast dtype of the forward pass (None: no autocast).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: Defaults of ``--batch-sizes`` and ``--freqs`` on a device.
BATCH_SIZES, FREQS = [32, 128], [(10, 100)]
#: The kinds of arm.
SGD, KFAC_DIST, KAISA = "sgd", "kfac-dist", "kaisa"


@dataclass
class DeviceSettings:
    """Everything a device run depends on (stored in the JSON).

    ``count_model`` is the CPU-sized stand-in of ``model`` (the same layers at width 1/8 on 32x32 inputs) whose
    ATen operators per kind of step the report lists.
    """

    device: str
    model: ModelSpec = RESNET50
    count_model: ModelSpec = PROXY
    batch_sizes: list[int] = field(default_factory=lambda: list(BATCH_SIZES))
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    methods: list[str] = field(default_factory=lambda: list(COMPUTE_METHODS))
    precisions: list[str] = field(default_factory=lambda: ["highest"])
    freqs: list[tuple[int, int]] = field(default_factory=lambda: list(FREQS))
    rounds: int = 3
    min_block_steps: int = 20
    warmup_steps: int = 10
    profile_blocks: int = 1
    batch_pool: int = 8
    compare_kaisa: bool = False
    lr: float = 0.01
    seed: int = 0

    def jsonable(self) -> dict[str, Any]:
        """The settings as JSON."""
        return asdict(self) | {"model": self.model.describe(), "count_model": self.count_model.describe()}


class DeviceArm:
    """An :class:`~kfac_dist.app.bench.arms.Arm` trained on its device, under autocast to `dtype` (None: none).

    The arm holds the model, its batches, SGD-momentum and kfac-dist's preconditioner (if any); `kaisa` is KAISA's
    preconditioner on the arm's model instead (``kind`` is ``"sgd"``, ``"kfac-dist"`` or ``"kaisa"``).
    """

    def __init__(
        self,
        arm: Arm,
        kind: str,
        method: str | None,
        dtype: torch.dtype | None,
        kaisa: Any = None,
        precision: str = "highest",
    ) -> None:
        self.arm, self.kind, self.method, self.dtype, self.kaisa = arm, kind, method, dtype, kaisa
        self.precision = precision
        self.device_type = next(arm.model.parameters()).device.type

    @property
    def name(self) -> str:
        """The arm's name."""
        return self.arm.name

    def run(self, steps: int, clock: Clock, regions: bool = False) -> Block:
        """Train ``steps`` steps; the block's time by `clock`.

        `regions`: also time every region of a step (:data:`~kfac_dist.app.bench.arms.REGIONS`), synchronising the
        device at each boundary, and read kfac-dist's phase times when it profiles.
        """
        arm, pre = self.arm, self.arm.pre
        profiled = regions and arm.profiled and pre is not None
        times = dict.fromkeys(REGIONS, 0.0)
        last = [0.0]

        def lap(name: str) -> None:
            if regions:
                clock.sync()
                now = time.perf_counter()
                times[name] += now - last[0]
                last[0] = now

        preconditioner = pre if pre is not None else self.kaisa  # None: plain SGD
        autocast = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        if pre is not None:
            pre.reset_phase_times()
        gc.collect()
        cpu = time.process_time()
        clock.start()
        last[0] = time.perf_counter()
        loss = None
        for _ in range(steps):
            x, y = arm.batches[arm.position % len(arm.batches)]
            arm.position += 1
            arm.optimizer.zero_grad()
            lap("zero_grad")
            before = pre.phase_times()["factor_computation"] if profiled and pre is not None else 0.0
            with autocast:
                loss = F.cross_entropy(arm.model(x), y)
            lap("forward")
            if profiled and pre is not None:
                times["factor_in_forward"] += pre.phase_times()["factor_computation"] - before
            loss.backward()
            lap("backward")
            if preconditioner is not None:
                preconditioner.step()
            lap("kfac_step")
            arm.optimizer.step()
            lap("optimizer_step")
        block = Block(steps, clock.stop(), time.process_time() - cpu, times)
        if loss is not None:
            arm.last_loss = float(loss.detach())
        if profiled and pre is not None:
            block.library = pre.phase_times()
        return block


def build_arms(settings: DeviceSettings, batch: int, dtype: str, freq: tuple[int, int]) -> list[DeviceArm]:
    """SGD, kfac-dist per method and (with ``compare_kaisa``) KAISA per method, on the same weights and batches."""
    device = torch.device(settings.device)
    initial = settings.model.build(settings.seed).to(device)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    batches = []
    for _ in range(settings.batch_pool):
        x, y = settings.model.batch(batch, generator)
        batches.append((x.to(device), y.to(device)))
    autocast = DTYPES[dtype]
    arms = [DeviceArm(Arm("SGD", copy.deepcopy(initial), batches, None, settings.lr), SGD, None, autocast)]
    options = {
        method: KFACOptions(factor_update_steps=freq[0], inv_update_steps=freq[1], compute_method=method)
        for method in settings.methods
    }
    for method, kfac in options.items():
        for precision in settings.precisions:  # "kfac-dist eigen" is the exact one, "kfac-dist eigen tf32" others
            name = f"kfac-dist {method}" + ("" if precision == "highest" else f" {precision}")
            arm = Arm(name, copy.deepcopy(initial), batches, replace(kfac, precision=precision), settings.lr)
            arms.append(DeviceArm(arm, KFAC_DIST, method, autocast, precision=precision))
    if settings.compare_kaisa:
        for method, kfac in ((m, o) for m, o in options.items() if m in KAISA_METHODS):
            arm = Arm(f"KAISA {method}", copy.deepcopy(initial), batches, None, settings.lr)
            kaisa = kaisa_preconditioner(arm.model, kfac, settings.lr)
            arms.append(DeviceArm(arm, KAISA, method, autocast, kaisa))
    return arms


def _per_step(blocks: list[Block], seconds: Callable[[Block], float]) -> list[float]:
    return [b.per_step_ms(seconds(b)) for b in blocks]


class _Runs:
    """Runs blocks of the arms; a KAISA arm that raises is left out from then on, with its error kept."""

    def __init__(self, clock: Clock, log: Log) -> None:
        self.clock, self.log = clock, log
        self.failed: dict[str, str] = {}

    def __call__(self, arm: DeviceArm, steps: int, regions: bool = False) -> Block | None:
        if arm.name in self.failed:
            return None
        try:
            return arm.run(steps, self.clock, regions)
        except RuntimeError as error:  # e.g. torch.linalg.LinAlgError: KAISA has no fallback for a failed eigh
            if arm.kind != KAISA:
                raise
            self.failed[arm.name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            self.log(f"  {arm.name} failed ({self.failed[arm.name]}); left out from here on")
            return None


def _arm_result(arm: DeviceArm, blocks: list[Block], profiled: list[Block], sgd: list[float]) -> dict[str, Any]:
    """An arm's step times (and ratios to SGD's `sgd` per round), profiled regions and phases.

    ``host_cpu_ms`` is the process's CPU time per step of the timed blocks; on CUDA it includes the host's spinning
    while it waits for the GPU (a full launch queue, the final event), so it is an upper bound of the host's work.
    """
    step_ms = _per_step(blocks, lambda b: b.wall)
    host_ms = _per_step(blocks, lambda b: b.cpu)
    middle = sorted(profiled, key=lambda b: b.wall)[len(profiled) // 2]  # the profiled block of median time
    result: dict[str, Any] = {
        "kind": arm.kind,
        "method": arm.method,
        "precision": arm.precision,
        "step_ms": step_ms,
        "median_ms": statistics.median(step_ms),
        "ratio": statistics.median(step_ms) / statistics.median(sgd),
        "ratio_per_round": [a / s for a, s in zip(step_ms, sgd, strict=True)],
        "host_cpu_ms": host_ms,
        "median_host_cpu_ms": statistics.median(host_ms),
        "profiled_step_ms": middle.per_step_ms(middle.wall),
        "coarse_ms": coarse(middle),
        "final_loss": arm.arm.last_loss,
    }
    if arm.arm.pre is not None:
        result["profiled"] = breakdown(middle)
        result["health"] = arm.arm.pre.health()
    return result


def measure(
    settings: DeviceSettings, batch: int, dtype: str, freq: tuple[int, int], log: Log = print
) -> dict[str, Any]:
    """Every arm at one batch size, dtype and frequency pair: interleaved timed blocks, then profiled blocks."""
    runs = _Runs(clock_for(torch.device(settings.device)), log)
    arms = build_arms(settings, batch, dtype, freq)
    for arm in arms:
        runs(arm, block_steps(freq, settings.warmup_steps))
    steps = block_steps(freq, settings.min_block_steps)
    blocks: dict[str, list[Block]] = {arm.name: [] for arm in arms}
    for r in range(settings.rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            block = runs(arm, steps)
            if block is not None:
                blocks[arm.name].append(block)
        log(
            f"  batch {batch} {dtype} {freq} round {r + 1}/{settings.rounds}: "
            + ", ".join(f"{a.name} {blocks[a.name][-1].per_step_ms(blocks[a.name][-1].wall):.2f} ms"
                        for a in arms if a.name not in runs.failed)
        )  # fmt: skip
    entry: dict[str, Any] = {"batch": batch, "dtype": dtype, "freq": list(freq), "block_steps": steps}
    entry |= {"rounds": settings.rounds, "arms": {}}
    sgd = _per_step(blocks[arms[0].name], lambda b: b.wall)
    for arm in arms:
        arm.arm.rebuild(profile=True, align=True)
        profiled = [runs(arm, steps, regions=True) for _ in range(settings.profile_blocks)]
        if arm.name in runs.failed:
            entry["arms"][arm.name] = {"kind": arm.kind, "method": arm.method, "failed": runs.failed[arm.name]}
        else:
            entry["arms"][arm.name] = _arm_result(arm, blocks[arm.name], [b for b in profiled if b is not None], sgd)
    entry["kaisa_over_kfac_dist"] = {
        method: entry["arms"][f"KAISA {method}"]["median_ms"] / entry["arms"][f"kfac-dist {method}"]["median_ms"]
        for method in settings.methods
        if "failed" not in entry["arms"].get(f"KAISA {method}", {"failed": "not run"})
    }
    return entry


def run_device(settings: DeviceSettings, log: Log = print) -> dict[str, Any]:
    """Every batch size x dtype x frequency pair; the results dict (JSON-ready, without ``meta`` and counts)."""
    device = torch.device(settings.device)
    results = []
    for batch in settings.batch_sizes:
        for dtype in settings.dtypes:
            for freq in settings.freqs:
                log(f"{settings.model.builder} on {device.type}: batch {batch}, {dtype}, frequencies {freq}")
                results.append(measure(settings, batch, dtype, freq, log))
    return {
        "protocol": "device",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backends": _backends() if device.type == "cuda" else {},
        "model": settings.model.describe(),
        "tolerance": TOLERANCE,
        "results": results,
    }


def _backends() -> dict[str, Any]:
    """The CUDA settings that change fp32 speed (TF32) and convolution algorithms."""
    return {
        "cuda": torch.version.cuda,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
