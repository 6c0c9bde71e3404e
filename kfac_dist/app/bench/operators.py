"""ATen operators dispatched per K-FAC step, by kind of step: the machine-independent measure of launch overhead.

On a GPU every operator is a kernel launch plus Python; a CPU cannot show that cost, but it dispatches the same
operators, so their count measures it on any machine. Protocol: docs/BENCHMARKS.md section 6.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench.common import PROXY, Log, ModelSpec, positive_int
from kfac_dist.app.processes import run_gloo
from kfac_dist.methods import COMPUTE_METHODS
from kfac_dist.placement import DEFAULT_GRAD_WORKER_FRACTION, resolve_grad_worker_fraction

__all__ = ["FULL", "KIND_STEPS", "OperatorCount", "add_arguments", "count_kinds", "count_step", "run"]

FULL = "the docs/ run: batch 32 (the count does not depend on the batch; the quick run uses 4)"
#: Factors every 2 steps and decompositions every 4, so that steps 4, 5 and 6 are an inverse, a plain and a factor
#: step in steady state (the first steps allocate what later steps reuse).
FREQ = (2, 4)
#: The step that stands for each kind.
KIND_STEPS = {"inverse": 4, "plain": 5, "factor": 6}


class OperatorCount(TorchDispatchMode):
    """Counts every ATen operator dispatched while it is active, by operator."""

    def __init__(self) -> None:
        super().__init__()
        self.by_operator: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Count the operator, then run it."""
        self.by_operator[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Operators counted."""
        return sum(self.by_operator.values())


def count_step(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pre: KFACPreconditioner | None
) -> tuple[OperatorCount, OperatorCount]:
    """Operators of one training step's forward + backward and of ``pre.step()`` (empty without K-FAC)."""
    x, y = batch
    model.zero_grad(set_to_none=False)
    with OperatorCount() as backprop:
        F.cross_entropy(model(x), y).backward()
    with OperatorCount() as step:
        if pre is not None:
            pre.step()
    return backprop, step


def _steps(
    spec: ModelSpec, batch_size: int, method: str | None, fraction: float | str = DEFAULT_GRAD_WORKER_FRACTION
) -> dict[int, tuple[OperatorCount, OperatorCount]]:
    """Counts of steps 0 .. max(KIND_STEPS) of SGD (`method` None) or K-FAC with `method`, on this rank."""
    model = spec.build(seed=0)
    pre = None
    if method is not None:
        pre = KFACPreconditioner(
            model,
            compute_method=method,
            factor_update_steps=FREQ[0],
            inv_update_steps=FREQ[1],
            grad_worker_fraction=fraction,
        )
    batch = spec.batch(batch_size, torch.Generator().manual_seed(0))
    counts = {}
    for step in range(max(KIND_STEPS.values()) + 1):
        counts[step] = count_step(model, batch, pre)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-3)  # a plain SGD step outside the counts: the same for every arm
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's options."""
    parser.add_argument("--batch", type=positive_int, help="examples per step (default 4; --full: 32)")
    parser.add_argument(
        "--world-size", type=positive_int, default=1, help="ranks (gloo processes; counts of every rank, default 1)"
    )
    parser.add_argument(
        "--grad-worker-fraction",
        type=_fraction,
        default=DEFAULT_GRAD_WORKER_FRACTION,
        help=f"placement with --world-size > 1 (default {DEFAULT_GRAD_WORKER_FRACTION})",
    )


def _fraction(text: str) -> float | str:
    """A grad_worker_fraction from the command line: a strategy name or a number."""
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        resolve_grad_worker_fraction(value, 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def count_kinds(
    spec: ModelSpec,
    batch: int,
    methods: Sequence[str] = COMPUTE_METHODS,
    log: Log = print,
    fraction: float | str = DEFAULT_GRAD_WORKER_FRACTION,
) -> dict[str, Any]:
    """Operators of every kind of step (:data:`KIND_STEPS`) of K-FAC with each of `methods` on `spec`, beside SGD's.

    Returns:
        ``{"sgd_forward_backward": n, "methods": {method: {kind: counts}}}``; a kind's counts are its forward +
        backward, the ``hooks`` they add to SGD's, ``pre.step()``'s ``step``, ``extra`` = hooks + step, and the
        commonest operators of ``pre.step()``.
    """
    sgd = _steps(spec, batch, None)[KIND_STEPS["plain"]][0].total
    log(f"SGD forward + backward: {sgd} operators")
    counted: dict[str, Any] = {}
    for method in methods:
        counts = _steps(spec, batch, method, fraction)
        kinds = {}
        for kind, step in KIND_STEPS.items():
            backprop, pre_step = counts[step]
            kinds[kind] = {
                "forward_backward": backprop.total,
                "hooks": backprop.total - sgd,
                "step": pre_step.total,
                "extra": backprop.total - sgd + pre_step.total,
                "top_step_operators": dict(pre_step.by_operator.most_common(12)),
            }
            log(f"{method} {kind} step: {kinds[kind]['extra']} operators beyond SGD's {sgd}")
        counted[method] = kinds
    return {"sgd_forward_backward": sgd, "methods": counted}


def _rank_counts(rank: int, world_size: int, spec: ModelSpec, batch: int, fraction: float | str) -> dict[str, Any]:
    """:func:`count_kinds` on one rank of a gloo group (its K-FAC collectives included in the count)."""
    return count_kinds(spec, batch, COMPUTE_METHODS, lambda line: None, fraction)


def run(args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Count every kind of step of SGD and of K-FAC with each compute method on the ResNet-50 proxy.

    With ``--world-size W > 1`` every rank counts its own steps in a gloo group; the results are rank 0's, with
    the largest ``extra`` over the ranks beside them (``max_extra_over_ranks``).
    """
    batch = args.batch or (32 if args.full else 4)
    spec = ModelSpec(PROXY.builder, dict(PROXY.kwargs), PROXY.input_shape)
    world, fraction = args.world_size, args.grad_worker_fraction
    settings = {
        "model": spec.describe(),
        "batch": batch,
        "freq": list(FREQ),
        "kind_steps": KIND_STEPS,
        "world_size": world,
        "grad_worker_fraction": fraction,
    }
    if world == 1:
        return count_kinds(spec, batch, COMPUTE_METHODS, log, fraction), settings
    log(f"counting on {world} gloo ranks (grad_worker_fraction {fraction})")
    ranks = run_gloo(_rank_counts, world, spec, batch, fraction, timeout=1800.0, pg_timeout=600.0)
    results = ranks[0]
    results["max_extra_over_ranks"] = {
        method: {kind: max(r["methods"][method][kind]["extra"] for r in ranks) for kind in KIND_STEPS}
        for method in results["methods"]
    }
    for method, kinds in results["methods"].items():
        for kind, counts in kinds.items():
            log(
                f"{method} {kind} step, rank 0: {counts['extra']} operators beyond SGD's; max over ranks "
                f"{results['max_extra_over_ranks'][method][kind]}"
            )
    return results, settings
