"""When each part of a K-FAC step happens: capture, factor update, decomposition, preconditioning."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from kfac_dist import curvature
from kfac_dist.capture import FactorAccumulator
from kfac_dist.layers import KFACLayer, has_trainable_parameters, make_layer
from kfac_dist.options import (
    COMPUTE_METHODS,
    LOSS_REDUCTIONS,
    Hyper,
    check_choice,
    check_dtype,
    check_hyper,
    check_patterns,
    resolve,
)
from kfac_dist.report import HEALTH_COUNTERS, Report

logger = logging.getLogger("kfac_dist")

#: Default damping, in kfac-dist's factor scale (docs/conventions.md); chosen by measurement (docs/defaults.md).
DEFAULT_DAMPING = 1.0

GradScaler = Any  # torch.amp.GradScaler, or a callable returning the current loss scale


@dataclass
class LayerState:
    """Everything the preconditioner keeps for one layer."""

    layer: KFACLayer
    accumulator: FactorAccumulator
    factor_dtype: torch.dtype
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    decomposition: curvature.Decomposition | None = None
    fired: bool = False
    logged: set[str] = field(default_factory=set)

    def a_shape(self) -> tuple[int, ...]:
        """Shape of the stored A factor: ``(blocks, n)`` when diagonal, else ``(blocks, n, n)``."""
        blocks, side = self.layer.blocks, self.layer.a_side
        return (blocks, side) if self.layer.a_diagonal else (blocks, side, side)

    def g_shape(self) -> tuple[int, ...]:
        """Shape of the stored G factor, ``(blocks, m, m)``."""
        return (self.layer.blocks, self.layer.g_side, self.layer.g_side)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _default_factor_dtype(layer: KFACLayer) -> torch.dtype:
    """Factors in the weight's dtype, but at least float32 (half-precision factors lose too much)."""
    dtype = layer.module.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class KFACPreconditioner:
    """Kronecker-factored (K-FAC / KFC) preconditioner of a model's gradients.

    Call order each step: ``loss.backward(); pre.step(); optimizer.step()``. ``step()`` replaces the gradients of
    every supported layer by their preconditioned values; any ``torch.optim`` optimizer then applies them.

    Args:
        model: the model (a DistributedDataParallel wrapper is looked through).
        factor_update_steps: factors are captured and updated on steps ``k`` with ``k % factor_update_steps == 0``.
        inv_update_steps: decompositions are recomputed on steps ``k`` with ``k % inv_update_steps == 0``.
        damping: Tikhonov damping added to the Kronecker-factored curvature (our factor scale, see docs/).
        factor_decay: running-average decay of the factors, in [0, 1).
        kl_clip: KL-clip bound (Ba et al. 2017), or None to disable clipping.
        lr: learning rate used by KL-clip (pass the optimizer's).
        compute_method: "eigen" (exact damped Kronecker inverse) or "inverse" (factored damping with pi).
        loss_reduction: "mean" if the loss is the batch mean, "sum" if it is the batch sum.
        accumulation_steps: micro-batches per optimizer step (each micro-batch loss divided by this number).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale; G is unscaled with it.
        factor_dtype: dtype of the factors (default: the weight's dtype, at least float32).
        inv_dtype: dtype of the decompositions, float32 or float64.
        skip_layers: glob patterns matched against module names and class names; matches are not preconditioned.

    Hyperparameters ``factor_update_steps``, ``inv_update_steps``, ``damping``, ``factor_decay``, ``kl_clip`` and
    ``lr`` may be callables of the K-FAC step (the number of completed ``step()`` calls).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: Hyper = 1,
        inv_update_steps: Hyper = 1,
        damping: Hyper = DEFAULT_DAMPING,
        factor_decay: Hyper = 0.95,
        kl_clip: Hyper | None = 1e-3,
        lr: Hyper = 0.1,
        compute_method: str = "eigen",
        loss_reduction: str = "mean",
        accumulation_steps: int = 1,
        grad_scaler: GradScaler | None = None,
        factor_dtype: torch.dtype | None = None,
        inv_dtype: torch.dtype = torch.float32,
        skip_layers: Iterable[str] | str = (),
    ) -> None:
        self.factor_update_steps = check_hyper("factor_update_steps", factor_update_steps)
        self.inv_update_steps = check_hyper("inv_update_steps", inv_update_steps)
        self.damping = check_hyper("damping", damping)
        self.factor_decay = check_hyper("factor_decay", factor_decay)
        self.kl_clip = None if kl_clip is None else check_hyper("kl_clip", kl_clip)
        self.lr = check_hyper("lr", lr)
        self.compute_method = check_choice("compute_method", compute_method, COMPUTE_METHODS)
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.accumulation_steps = int(resolve("accumulation_steps", accumulation_steps, 0))
        if grad_scaler is not None and not (callable(grad_scaler) or hasattr(grad_scaler, "get_scale")):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or a callable; got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        self.factor_dtype = check_dtype("factor_dtype", factor_dtype, floats, allow_none=True)
        self.inv_dtype = check_dtype("inv_dtype", inv_dtype, (torch.float32, torch.float64), allow_none=False)
        self.skip_layers = check_patterns("skip_layers", skip_layers)

        self.model = _unwrap(model)
        self.steps = 0
        self._forward_passes = 0
        self._health = dict.fromkeys(HEALTH_COUNTERS, 0)
        self._report = Report()
        self._states: dict[str, LayerState] = {}
        self._register_layers()
        self._handles = [self.model.register_forward_pre_hook(self._count_forward_pass)]
        self._handles += [
            state.layer.module.register_forward_hook(partial(self._capture_input, state))
            for state in self._states.values()
        ]
        self._capturing = self._is_factor_step(0)

    # ----------------------------------------------------------------------------------------------- set-up
    def _register_layers(self) -> None:
        """Sort every trainable module into preconditioned, skipped or unsupported."""
        for name, module in self.model.named_modules():
            if not has_trainable_parameters(module):
                continue
            pattern = next(
                (
                    p
                    for p in self.skip_layers
                    if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(module).__name__, p)
                ),
                None,
            )
            if pattern is not None:
                self._report.skipped[name] = pattern
                continue
            layer = make_layer(name, module)
            if isinstance(layer, str):
                self._report.unsupported[name] = layer
                continue
            dtype = self.factor_dtype or _default_factor_dtype(layer)
            self._states[name] = LayerState(layer, FactorAccumulator(layer), dtype)
        if not self._states:
            raise ValueError(
                f"the model has no module K-FAC can precondition (supported: Linear, Conv1d, Conv2d, Embedding); "
                f"skipped: {sorted(self._report.skipped) or 'none'}, "
                f"unsupported: {sorted(self._report.unsupported) or 'none'}"
            )

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model (it stops capturing)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------------------------- capture
    def _is_factor_step(self, step: int) -> bool:
        return step % int(resolve("factor_update_steps", self.factor_update_steps, step)) == 0

    def _is_inverse_step(self, step: int) -> bool:
        return step % int(resolve("inv_update_steps", self.inv_update_steps, step)) == 0

    def _count_forward_pass(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._forward_passes += 1

    def _capture_input(
        self, state: LayerState, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        """Forward hook: on factor steps, add the input's contribution and hook the output's gradient."""
        if not (self._capturing and torch.is_grad_enabled()):
            return
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad:
            return
        inputs = args[0].detach()
        state.fired = True
        state.accumulator.add_input(inputs, self._forward_passes, state.factor_dtype)
        output.register_hook(partial(self._capture_output_grad, state, state.layer.examples(inputs)))

    def _capture_output_grad(self, state: LayerState, examples: int, grad_output: torch.Tensor) -> None:
        """Tensor hook on a module output: add the per-example output gradients' contribution."""
        scale = float(examples * self.accumulation_steps) if self.loss_reduction == "mean" else 1.0
        scale /= self._loss_scale()
        state.accumulator.add_output_grad(grad_output.detach(), state.factor_dtype, scale)

    def _loss_scale(self) -> float:
        if self.grad_scaler is None:
            return 1.0
        if hasattr(self.grad_scaler, "get_scale"):
            return float(self.grad_scaler.get_scale())
        return float(self.grad_scaler())

    # ----------------------------------------------------------------------------------------------- step
    def step(self) -> None:
        """Update factors and decompositions as scheduled and precondition the gradients in place."""
        step = self.steps
        active = [s for s in self._states.values() if s.layer.has_grad()]
        if not active:
            raise RuntimeError(
                "KFACPreconditioner.step() found no gradient on any preconditioned layer: "
                "call loss.backward() before pre.step()"
            )
        damping = resolve("damping", self.damping, step)
        if self._capturing:
            self._update_factors(step)
        inverse_step = self._is_inverse_step(step)
        self._update_decompositions(damping, only_missing=not inverse_step)
        self._precondition(active, damping, step)
        self.steps += 1
        self._capturing = self._is_factor_step(self.steps)

    def _update_factors(self, step: int) -> None:
        """Fold this step's batch factors into the running averages; skip non-finite ones."""
        decay = resolve("factor_decay", self.factor_decay, step)
        ready = [s for s in self._states.values() if s.accumulator.complete]
        batches = [s.accumulator.batch_factors() for s in ready]
        finite = (
            torch.stack([torch.isfinite(a).all() & torch.isfinite(g).all() for a, g in batches]).tolist()
            if batches
            else []
        )
        for state, (a, g), ok in zip(ready, batches, finite, strict=True):
            if not ok:
                self._count(
                    state, "nonfinite_factor_skipped", "a batch factor is not finite; kept the last average"
                )
                continue
            state.a = curvature.running_average(state.a, a, decay)
            state.g = curvature.running_average(state.g, g, decay)
        for state in self._states.values():
            state.accumulator.clear()

    def _update_decompositions(self, damping: float, only_missing: bool) -> None:
        """Decompose every layer's factors (or only those without a decomposition yet)."""
        for state in self._states.values():
            if state.a is None or state.g is None or (only_missing and state.decomposition is not None):
                continue
            state.decomposition = self._decompose(state, state.a, state.g, damping)

    def _decompose(
        self, state: LayerState, a: torch.Tensor, g: torch.Tensor, damping: float
    ) -> curvature.Decomposition | None:
        """Decompose in inv_dtype; retry in float64; else keep the previous decomposition."""
        dtypes = [self.inv_dtype] + ([torch.float64] if self.inv_dtype != torch.float64 else [])
        for attempt, dtype in enumerate(dtypes):
            try:
                result = curvature.decompose(
                    a,
                    g,
                    a_diagonal=state.layer.a_diagonal,
                    method=self.compute_method,
                    damping=damping,
                    dtype=dtype,
                )
            except curvature.DecompositionError as error:
                if attempt + 1 < len(dtypes):
                    self._count(state, "decomposition_retried_float64", f"{error}; retrying in float64")
                continue
            return result if dtype == self.inv_dtype else _cast(result, self.inv_dtype)
        if state.decomposition is not None:
            self._count(state, "decomposition_kept_previous", "decomposition failed; kept the previous one")
        else:
            self._count(state, "decomposition_unavailable", "decomposition failed; gradient left as it is")
        return state.decomposition

    def _precondition(self, active: list[LayerState], damping: float, step: int) -> None:
        """Replace gradients by their preconditioned values, KL-clipped."""
        ready = [s for s in active if s.decomposition is not None]
        grads = [s.layer.grad_matrix() for s in ready]
        results = [
            curvature.precondition(s.decomposition, m, damping)  # type: ignore[arg-type]
            for s, m in zip(ready, grads, strict=True)
        ]
        if self.kl_clip is not None and results:
            kl_clip = resolve("kl_clip", self.kl_clip, step)
            lr = resolve("lr", self.lr, step)
            scale = curvature.kl_clip_scale(results, grads, lr, kl_clip)
            results = [r * scale for r in results]
        for state, result in zip(ready, results, strict=True):
            state.layer.set_grad_matrix(result)

    def _count(self, state: LayerState, counter: str, message: str) -> None:
        """Count a numerical fallback and log it once per layer and kind."""
        self._health[counter] += 1
        if counter not in state.logged:
            state.logged.add(counter)
            logger.warning(
                "kfac_dist: layer %s: %s (further occurrences are only counted)", state.layer.name, message
            )

    # ----------------------------------------------------------------------------------------------- inspection
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module_name: (A, G)}``: current running averages (squeezed for single-block layers)."""
        return {
            name: (_squeeze(s.a), _squeeze(s.g))
            for name, s in self._states.items()
            if s.a is not None and s.g is not None
        }

    def report(self) -> Report:
        """Which modules are preconditioned, skipped, unsupported or inactive (hooks never fired)."""
        factor_step_seen = any(s.fired for s in self._states.values())
        inactive = [name for name, s in self._states.items() if factor_step_seen and not s.fired]
        return Report(
            preconditioned=[name for name in self._states if name not in inactive],
            skipped=dict(self._report.skipped),
            unsupported=dict(self._report.unsupported),
            inactive=inactive,
        )

    def health(self) -> dict[str, int]:
        """Counters of numerical fallbacks since construction."""
        return dict(self._health)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Steps and running-average factors (decompositions are recomputed after loading)."""
        return {
            "steps": self.steps,
            "factors": {
                name: {"A": s.a, "G": s.g}
                for name, s in self._states.items()
                if s.a is not None and s.g is not None
            },
            "health": dict(self._health),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; decompositions are recomputed at the next step."""
        factors = state_dict["factors"]
        unknown = sorted(set(factors) - set(self._states))
        if unknown:
            raise ValueError(
                f"state_dict holds factors of modules this preconditioner does not have: {unknown}"
            )
        for name, state in self._states.items():
            entry = factors.get(name)
            if entry is None:
                state.a = state.g = None
            else:
                _check_shape(name, "A", entry["A"], state.a_shape)
                _check_shape(name, "G", entry["G"], state.g_shape)
                state.a = entry["A"].to(state.factor_dtype).clone()
                state.g = entry["G"].to(state.factor_dtype).clone()
            state.decomposition = None
        self.steps = int(state_dict["steps"])
        self._health.update(state_dict.get("health", {}))
        self._capturing = self._is_factor_step(self.steps)


def _cast(decomposition: curvature.Decomposition, dtype: torch.dtype) -> curvature.Decomposition:
    """The decomposition with every tensor cast to ``dtype``."""
    if isinstance(decomposition, curvature.InverseDecomposition):
        return curvature.InverseDecomposition(decomposition.a_inv.to(dtype), decomposition.g_inv.to(dtype))
    q_a = None if decomposition.q_a is None else decomposition.q_a.to(dtype)
    return curvature.EigenDecomposition(
        q_a, decomposition.l_a.to(dtype), decomposition.q_g.to(dtype), decomposition.l_g.to(dtype)
    )


def _squeeze(factor: torch.Tensor | None) -> torch.Tensor:
    """Drop the block dimension of a single-block factor."""
    assert factor is not None
    return factor[0] if factor.shape[0] == 1 else factor


def _check_shape(
    name: str, which: str, tensor: torch.Tensor, expected: Callable[[], tuple[int, ...]]
) -> None:
    """Refuse a loaded factor whose shape does not fit the module."""
    shape = expected()
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"state_dict factor {which} of {name} has shape {tuple(tensor.shape)}, expected {shape}"
        )
