"""When each part of a K-FAC step happens: capture, factor exchange, decomposition, preconditioning."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from functools import partial
from typing import Any, Unpack, cast

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist import curvature
from kfac_dist.agreement import describe_options, option_differences
from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator
from kfac_dist.damping import DampingAdapter
from kfac_dist.exchange import Exchange, TensorFormat
from kfac_dist.fisher import LOSS_KINDS, sampled_loss
from kfac_dist.health import Health
from kfac_dist.layers.batched import stack_grad_matrices, write_grad_matrices
from kfac_dist.methods import get_method
from kfac_dist.options import (
    LOSS_REDUCTIONS,
    Hyper,
    KFACOptions,
    OptionOverrides,
    check_choice,
    check_flag,
    check_hyper,
    check_value,
    range_of,
)
from kfac_dist.placement import Plan, build_plan, resolve_grad_worker_fraction
from kfac_dist.precision import matmul_mode
from kfac_dist.registry import LayerState, common_dtype, describe_shapes, first_difference, register_layers, unwrap
from kfac_dist.report import Report
from kfac_dist.schedule import DecompositionSchedule
from kfac_dist.state import require_every_rank, restore_decompositions, restore_factors
from kfac_dist.timing import PhaseTimer
from kfac_dist.worklist import ShapeGroup, build_groups

#: Seconds `state_dict()` and `load_state_dict()` wait for every rank to call them before raising.
STATE_TIMEOUT_S = 60.0

GradScaler = Any  # torch.amp.GradScaler, or a callable returning the current loss scale


def default_communicator() -> Communicator:
    """torch.distributed's communicator when a process group is initialised, else the one-process world."""
    if dist.is_available() and dist.is_initialized():
        return TorchDistCommunicator()
    return LocalCommunicator()


class KFACPreconditioner:
    """Kronecker-factored (K-FAC / KFC) preconditioner of a model's gradients, on one rank or many.

    Call order each step: ``loss.backward(); pre.step(); optimizer.step()``. ``step()`` replaces the gradients of
    every supported layer by their preconditioned values; any ``torch.optim`` optimizer then applies them. With
    several ranks, gradients must already be averaged over ranks when ``step()`` runs (DDP does this).

    Args:
        model: the model (a DistributedDataParallel wrapper is looked through).
        options: K-FAC's options (:class:`kfac_dist.options.KFACOptions`: frequencies, damping, factor decay, KL-clip,
            compute method, placement, communication, dtypes, skipped layers); default: every default.
        lr: learning rate used by KL-clip (pass the optimizer's; a constant or a callable of the K-FAC step).
        loss_reduction: "mean" if the loss is the batch mean, "sum" if it is the batch sum.
        accumulation_steps: micro-batches per optimizer step (each micro-batch loss divided by this number).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale; G is unscaled with it.
        communicator: how bytes move (default: torch.distributed if initialised, else one process).
        profile: record wall-clock seconds per K-FAC phase (:meth:`phase_times`, :mod:`kfac_dist.timing`).
        **overrides: any field of :class:`~kfac_dist.options.KFACOptions` by name, replacing its value in
            ``options`` (``KFACPreconditioner(model, damping=0.1)``).

    Construction is collective: every rank must pass the same options (callables: the same value at step 0; see
    :mod:`kfac_dist.agreement`) and an equal model, else every rank raises `RuntimeError` naming what differs.
    """

    def __init__(
        self,
        model: nn.Module,
        options: KFACOptions | None = None,
        *,
        lr: Hyper = 0.1,
        loss_reduction: str = "mean",
        accumulation_steps: int = 1,
        grad_scaler: GradScaler | None = None,
        communicator: Communicator | None = None,
        profile: bool = False,
        **overrides: Unpack[OptionOverrides],
    ) -> None:
        if options is not None and not isinstance(options, KFACOptions):
            raise ValueError(f"options must be a KFACOptions; got {type(options).__name__}")
        self.options = replace(options or KFACOptions(), **cast(dict[str, Any], overrides))
        self.method = get_method(self.options.compute_method)
        self.lr = check_hyper("lr", lr, range_of("lr"))
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.accumulation_steps = int(
            check_value("accumulation_steps", accumulation_steps, range_of("accumulation_steps"))
        )
        if grad_scaler is not None and not (callable(grad_scaler) or hasattr(grad_scaler, "get_scale")):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or a callable; got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        self.inv_dtype = self.options.inverse_dtype()
        self.comm = communicator if communicator is not None else default_communicator()
        fraction = resolve_grad_worker_fraction(self.options.grad_worker_fraction, self.comm.world_size)
        options_used = self.options.to_dict() | {
            "grad_worker_fraction": fraction,
            "lr": self.lr,
            "loss_reduction": self.loss_reduction,
            "accumulation_steps": self.accumulation_steps,
            "grad_scaler": grad_scaler,
        }
        disagreement = option_differences(self.comm.gather_strings(describe_options(options_used)))
        if disagreement is not None:  # before any collective whose shape depends on an option
            raise RuntimeError(disagreement)

        self.model = unwrap(model)
        self._states, self._report = register_layers(self.model, self.options.skip_layers)
        self._grad_dtype = common_dtype(self._states, "model")
        self._factor_dtype = self.options.factor_dtype_for(self._grad_dtype)
        shapes = [state.shape() for state in self._states.values()]
        mismatch = first_difference(self.comm.gather_strings("\n".join(describe_shapes(shapes))))
        if mismatch is not None:
            raise RuntimeError(mismatch)
        self._plan = build_plan(shapes, self.comm.world_size, fraction, self.options.assignment)
        self.comm.check_same(self._plan.fingerprint(), "K-FAC plan fingerprint")
        self.comm.create_groups(self._plan.groups())
        tensors = TensorFormat(
            factor_dtype=self._factor_dtype,
            inv_dtype=self.inv_dtype,
            grad_dtype=self._grad_dtype,
            device=next(iter(self._states.values())).layer.parameters()[0].device,
        )
        self._exchange = Exchange(self._plan, shapes, self.comm, self.options, tensors)
        rank = self.comm.rank
        self._worked = set(self._plan.layers_worked_by(rank))
        self._broadcast_sources = {
            name for name in self._worked if any(src == rank for src, _ in self._plan.layer(name).grad_broadcasts)
        }
        mine = self._worked | set(self._plan.layers_owned_by(rank))
        self._groups = build_groups(state for name, state in self._states.items() if name in mine)
        self._schedule = DecompositionSchedule(self._plan, shapes, self.options)

        self.steps = 0
        self._forward_passes = 0
        self._passes_this_step = 0
        self._force_inverse = False
        self._health = Health()
        self._timer = PhaseTimer(check_flag("profile", profile), tensors.device)
        self._adapter = None
        if self.options.adaptive_damping:  # from a constant damping (KFACOptions checks)
            self._adapter = DampingAdapter(self.options.value("damping", 0), tensors.device)
        self._outputs: list[torch.Tensor] = []  # fisher="mc": this micro-batch's module outputs, for backward()
        self._sampling = False
        self._sampled_passes = 0
        self._kl_clip_scale: torch.Tensor | None = None
        self._handles = [self.model.register_forward_pre_hook(self._count_forward_pass)]
        self._handles += [
            state.layer.module.register_forward_hook(partial(self._capture_input, state))
            for state in self._states.values()
        ]
        self._capturing = self._is_factor_step(0)

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model (it stops capturing)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------------------------- capture
    def _is_factor_step(self, step: int) -> bool:
        warming_up = step < self.options.factor_warmup_steps
        return warming_up or step % int(self.options.value("factor_update_steps", step)) == 0

    def _count_forward_pass(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._forward_passes += 1
        if torch.is_grad_enabled():
            self._passes_this_step += 1

    def _capture_input(self, state: LayerState, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: on factor steps, add the input's contribution and hook the output's gradient."""
        if not (self._capturing and torch.is_grad_enabled()):
            return
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad:
            return
        inputs = args[0]
        state.fired = True
        with self._timer.phase("factor_computation"), torch.no_grad(), self._matmul_mode():
            state.accumulator.add_input(inputs, self._forward_passes, self._factor_dtype, self.options.precision)
        output.register_hook(partial(self._capture_output_grad, state, state.layer.examples(inputs)))
        if self.options.fisher == "mc":
            self._outputs.append(output)

    def _capture_output_grad(self, state: LayerState, examples: int, grad_output: torch.Tensor) -> None:
        """Tensor hook on a module output: add the output gradient; hand finished layers to the exchange.

        With ``fisher="mc"`` only the sampled pass of :meth:`backward` is captured, not the user's own backward.
        """
        if self.options.fisher == "mc" and not self._sampling:
            return
        scale = float(examples * self.accumulation_steps) if self.loss_reduction == "mean" else 1.0
        scale /= self._loss_scale()
        accumulator = state.accumulator
        with self._timer.phase("factor_computation"), torch.no_grad(), self._matmul_mode():
            accumulator.add_output_grad(grad_output, self._factor_dtype, scale, self.options.precision)
        if accumulator.pending == 0 and self._passes_this_step >= self.accumulation_steps:
            self._send_factors(state)

    def _send_factors(self, state: LayerState) -> None:
        """Copy a finished layer's batch factors into the reduction buckets and free its sums."""
        self._exchange.add_factors(state.name, *state.accumulator.take_batch_factors())
        state.sent = True

    def _loss_scale(self) -> float:
        if self.grad_scaler is None:
            return 1.0
        if hasattr(self.grad_scaler, "get_scale"):
            return float(self.grad_scaler.get_scale())
        return float(self.grad_scaler())

    # ----------------------------------------------------------------------------------------------- backward
    def backward(
        self,
        loss: torch.Tensor,
        outputs: torch.Tensor,
        loss_kind: str = "cross_entropy",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """``loss.backward()``, after, on factor steps with ``fisher="mc"``, the sampled pass of the true Fisher.

        Call it instead of ``loss.backward()`` (once per micro-batch): ``pre.backward(loss, logits)``. With
        ``fisher="mc"`` on a factor step it first back-propagates the ``loss_kind`` loss of ``outputs`` (the model's
        outputs that ``loss`` was computed from) against targets drawn from the model's predictive distribution
        (:func:`kfac_dist.fisher.sampled_loss`), scaled as ``loss`` is (``1 / accumulation_steps`` and the loss
        scale), down to the preconditioned modules' outputs only: the G factors are made of it and the parameters'
        gradients are not touched. Then ``loss.backward()`` makes the gradients as usual (their G contributions are
        ignored). Otherwise it is ``loss.backward()``.

        Args:
            loss: what the caller would call ``backward()`` on (already divided and scaled as usual).
            outputs: the model's outputs ``loss`` was computed from (logits for the cross-entropies).
            loss_kind: ``"cross_entropy"``, ``"binary_cross_entropy"`` (with logits) or ``"mse"``.
            generator: the random generator of the draws (default: torch's global one).
        """
        check_choice("loss_kind", loss_kind, LOSS_KINDS)
        if self.options.fisher == "mc" and self._capturing and self._outputs:
            sampled = sampled_loss(outputs, loss_kind, self.loss_reduction, generator)
            sampled = sampled * (self._loss_scale() / self.accumulation_steps)
            captured, self._outputs = self._outputs, []
            self._sampling = True
            try:
                torch.autograd.grad(sampled, captured, retain_graph=True, allow_unused=True)
            finally:
                self._sampling = False
            self._sampled_passes += 1
        loss.backward()

    # ----------------------------------------------------------------------------------------------- step
    def step(self) -> None:
        """Update factors and decompositions as scheduled and precondition the gradients in place."""
        step = self.steps
        if not any(s.layer.has_grad() for s in self._states.values()):
            raise RuntimeError(
                "KFACPreconditioner.step() found no gradient on any preconditioned layer: "
                "call loss.backward() before pre.step()"
            )
        if self._adapter is not None:
            self._adapter.probe = None  # an adjustment not made after the last step (e.g. a skipped one) is dropped
        if self._capturing and self.options.fisher == "mc" and self._sampled_passes == 0:
            raise RuntimeError(
                "fisher='mc' samples the G factors' labels in KFACPreconditioner.backward(loss, outputs): call it "
                "instead of loss.backward() (on every step; on a factor step it adds the sampled pass)"
            )
        damping = self.damping
        if self._capturing:
            self._update_factors(step)
            if self._adapter is not None:
                self._adapter.take_probe(self._states[name] for name in self._plan.layers_owned_by(self.comm.rank))
        due = self._schedule.names if self._force_inverse else self._schedule.due(step)
        if due:
            self._update_decompositions(damping, due)
            self._force_inverse = False
        self._precondition(damping, step)
        self.steps += 1
        self._passes_this_step = self._sampled_passes = 0
        self._outputs = []
        self._capturing = self._is_factor_step(self.steps)

    # ----------------------------------------------------------------------------------------------- damping
    @property
    def damping(self) -> float:
        """The damping of the current step: ``damping``'s value, or where ``adaptive_damping`` has moved it."""
        if self._adapter is not None:
            return self._adapter.damping
        return self.options.value("damping", self.steps)

    @property
    def adaptation_due(self) -> bool:
        """Whether the last ``step()`` expects :meth:`adapt_damping` (``adaptive_damping``, a factor step)."""
        return self._adapter is not None and self._adapter.probe is not None

    def adapt_damping(self, loss_before: float | torch.Tensor, loss_after: float | torch.Tensor) -> float:
        """Move the damping by the reduction ratio of the last step's update (:mod:`kfac_dist.damping`).

        Call it on every rank after the optimizer's step whenever :attr:`adaptation_due`, with this rank's loss on
        its batch before the update (the step's loss) and after it (one more forward pass of the same batch, no
        gradient). Collective: the ranks' losses are averaged and the curvature terms summed over the layers'
        owners. Returns the new damping.
        """
        if self._adapter is None or self._adapter.probe is None:
            raise RuntimeError("adapt_damping() follows a step() that expects it: check pre.adaptation_due first")
        return self._adapter.adapt(self._states, loss_before, loss_after, self.comm, self.steps)

    def _update_factors(self, step: int) -> None:
        """Reduce this step's batch factors and fold them into the running averages this rank keeps."""
        for state in self._states.values():
            if state.accumulator.complete and not state.sent:
                self._send_factors(state)
        with self._timer.phase("factor_communication"):
            reduced = self._exchange.reduce_factors()
        with self._timer.phase("factor_update"):
            self._fold_in(reduced, self.options.value("factor_decay", step))
        for state in self._states.values():
            state.accumulator.clear()
            state.sent = False

    def _fold_in(self, reduced: dict[str, tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
        """Update the running averages with the reduced batch factors, every layer at once; skip non-finite ones.

        A batch factor counts as non-finite when its norm is (a NaN/Inf element, or a norm past the dtype's range),
        read with one host sync per factor step.
        """
        ready = [(self._states[name], a, g) for name, (a, g) in reduced.items() if self._states[name].sent]
        if not ready:
            return
        norms = torch._foreach_norm([t for _, a, g in ready for t in (a, g)])
        finite = torch.isfinite(torch.stack(norms)).view(-1, 2).all(dim=1).tolist()
        averages, batches = [], []
        for (state, a, g), ok in zip(ready, finite, strict=True):
            if not ok:
                self._health.count(
                    state, "nonfinite_factor_skipped", "a batch factor is not finite; kept the last average"
                )
            elif state.a is None or state.g is None:
                state.a, state.g = a.clone(), g.clone()
            else:
                averages += [state.a, state.g]
                batches += [a, g]
        if averages:
            torch._foreach_mul_(averages, decay)
            torch._foreach_add_(averages, batches, alpha=1.0 - decay)

    def _update_decompositions(self, damping: float, due: tuple[str, ...]) -> None:
        """Owners decompose the factors of the layers ``due``, a shape group at a time; grad workers receive them."""
        mine = set(self._plan.layers_owned_by(self.comm.rank)) & set(due)
        with self._timer.phase("decomposition"):
            for group in self._groups:
                members = [s for s in group.states if s.name in mine and s.a is not None and s.g is not None]
                if members:
                    self._decompose(group, members, damping)
            owned = {name: self._states[name].decomposition for name in due if name in mine}
        with self._timer.phase("decomposition_broadcast"):
            shared = self._exchange.share_decompositions(owned, due)
        for name, decomposition in shared.items():
            self._states[name].decomposition = decomposition

    def _decompose(self, group: ShapeGroup, members: list[LayerState], damping: float) -> None:
        """One batched decomposition of the members; each member on its own (with fallbacks) if that fails."""
        previous = None
        if self.method.warm_starts and all(s.decomposition is not None for s in members):
            previous = group.stacked(self.method, members)
        stacked = self._health.decompose_group(
            members, previous, method=self.method, damping=damping, dtype=self.inv_dtype
        )
        if stacked is not None:
            group.adopt(members, stacked)
            return
        for state in members:
            state.decomposition = self._health.decompose(
                state, method=self.method, damping=damping, dtype=self.inv_dtype
            )

    def _precondition(self, damping: float, step: int) -> None:
        """Grad workers precondition, a shape group at a time, the others receive; then KL-clip and write ``.grad``."""
        computed: list[tuple[list[LayerState], torch.Tensor, torch.Tensor]] = []
        worked = self._worked
        with self._timer.phase("preconditioning"), self._matmul_mode():
            for group in self._groups:
                members = [
                    s for s in group.states if s.name in worked and s.decomposition is not None and s.layer.has_grad()
                ]
                if members:
                    raw = stack_grad_matrices([s.layer for s in members])
                    terms = group.terms(self.method, members, damping, self.options.precision)
                    computed.append((members, self.method.apply(terms, raw).to(self._grad_dtype), raw))
        with self._timer.phase("gradient_broadcast"):
            sent = {}
            for members, matrix, _ in computed:
                if any(state.name in self._broadcast_sources for state in members):
                    for state, part in zip(members, matrix.split(members[0].layer.blocks), strict=True):
                        if state.name in self._broadcast_sources:
                            sent[state.name] = part
            received = self._exchange.share_gradients(sent)
        with self._timer.phase("kl_clip"):
            self._clip_and_write(computed, received, step)

    def _clip_and_write(
        self,
        computed: list[tuple[list[LayerState], torch.Tensor, torch.Tensor]],
        received: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        """KL-clip every preconditioned gradient and write it into ``.grad``, without a host sync.

        ``computed``: per shape group, its members, their preconditioned and their raw gradient matrices.
        """
        arrived = [
            (state, received[name], state.layer.grad_matrix())
            for name, state in self._states.items()
            if name in received and state.layer.has_grad()
        ]
        pairs = [(matrix, raw) for _, matrix, raw in computed] + [(value, raw) for _, value, raw in arrived]
        if not pairs:
            return
        # Non-finite gradients are counted on the device (no host sync): with KL-clip from its inner product, which
        # is NaN/Inf when any preconditioned or raw gradient is (then so is what is written); without, from a
        # float64 sum of what is written.
        scale = None
        if self.options.kl_clip is not None:
            checked = curvature.kl_inner([m for m, _ in pairs], [r for _, r in pairs])
            lr = check_value("lr", self.lr(step), range_of("lr"), step) if callable(self.lr) else float(self.lr)
            scale = curvature.kl_clip_scale(checked, lr, self.options.value("kl_clip", step))
            self._kl_clip_scale = scale
        else:
            checked = torch.stack([m.sum(dtype=torch.float64) for m, _ in pairs]).sum()
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for members, matrix, _ in computed:
            write_grad_matrices([s.layer for s in members], matrix, copies)
        if copies:
            torch._foreach_copy_([grad for grad, _ in copies], [value for _, value in copies])
        if scale is not None and computed:
            written = [p.grad for members, _, _ in computed for s in members for p in s.layer.parameters()]
            torch._foreach_mul_(cast(list[torch.Tensor], written), scale)
        # A received all-zero gradient means "not preconditioned" (a preconditioned gradient is zero only when
        # the raw one is): keep the raw gradient then, decided on the device.
        for state, value, raw in arrived:
            if scale is not None:
                value = value * scale.to(value.dtype)
            state.layer.set_grad_matrix(torch.where((received[state.name] == 0).all(), raw, value))
        self._health.tally("nonfinite_gradient", ~torch.isfinite(checked))

    def _matmul_mode(self) -> contextlib.AbstractContextManager[None]:
        """The ``precision`` option's matmul mode for K-FAC's products (:func:`kfac_dist.precision.matmul_mode`)."""
        return matmul_mode(self.options.precision, self._exchange.tensors.device)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (collective), so every rank takes the same branch."""
        return any(text == "1" for text in self.comm.gather_strings("1" if flag else "0"))

    # ----------------------------------------------------------------------------------------------- inspection
    @property
    def kl_clip_scale(self) -> torch.Tensor | None:
        """The last preconditioned step's KL-clip factor ``min(1, sqrt(kl_clip / (lr^2 |v^T g|)))``, a 0-d tensor.

        Below 1 where the clip bound that step (its gradients were scaled by it); ``None`` before the first clipped
        step or without ``kl_clip``. Kept on the device: reading it is the caller's host synchronisation.
        """
        return self._kl_clip_scale

    def phase_times(self) -> dict[str, float]:
        """Seconds spent per K-FAC phase since construction or :meth:`reset_phase_times` (needs ``profile=True``)."""
        return dict(self._timer.seconds)

    def reset_phase_times(self) -> None:
        """Zero the phase timers."""
        self._timer.reset()

    def plan(self) -> Plan:
        """The placement every rank holds."""
        return self._plan

    def comm_stats(self) -> dict[str, dict[str, int]]:
        """Bytes this rank sent and received since construction, by category."""
        return self.comm.stats()

    def memory_usage(self) -> dict[str, int]:
        """Bytes of K-FAC state held on this rank, by category.

        ``factors``: running averages; ``decompositions``: eigenbases/inverses; ``buffers``: the fusion buckets
        of the last factor step's reduction (the batch factors of every layer, packed with ``symmetric_comm``;
        each layer's full-square sums are freed as soon as they are copied in).
        """
        factors = sum(t.nbytes for s in self._states.values() for t in (s.a, s.g) if t is not None)
        decompositions = sum(s.decomposition.nbytes() for s in self._states.values() if s.decomposition is not None)
        return {"factors": factors, "decompositions": decompositions, "buffers": self._exchange.factor_buffer_bytes}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module_name: (A, G)}``: running averages this rank keeps (squeezed for single-block layers)."""
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
        """Counters of numerical fallbacks on this rank since construction (see ``kfac_dist.report.HEALTH_COUNTERS``).

        ``nonfinite_gradient`` counts steps on which a gradient ``step()`` wrote was NaN/Inf (passed on as it is:
        what to do with such a step is the training loop's choice). It is tallied on the device and read here, so
        call this at most once per logging interval where a host sync matters.
        """
        return self._health.totals()

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self, *, timeout: float = STATE_TIMEOUT_S) -> dict[str, Any]:
        """Steps and every layer's running factors and decompositions, independent of the placement.

        Collective: every rank calls it and gets the same state, gathered from the layers' owners, so a run can
        resume on any number of ranks. Call it on every rank and save on one::

            state = pre.state_dict()
            if rank == 0:
                torch.save(state, path)

        Called on some ranks only, it raises `RuntimeError` on them after `timeout` seconds (torch.distributed;
        see :meth:`Communicator.rendezvous`) instead of blocking forever, and the other ranks are not disturbed.
        """
        require_every_rank(self.comm, "state_dict()", timeout)
        kept = {name: (s.a, s.g) for name, s in self._states.items() if s.a is not None and s.g is not None}
        factors = self._exchange.gather_factors(kept)
        owned = {name: self._states[name].decomposition for name in self._plan.layers_owned_by(self.comm.rank)}
        return {
            "steps": self.steps,
            "factors": {name: {"A": a, "G": g} for name, (a, g) in factors.items()},
            "compute_method": self.options.compute_method,
            "decompositions": self._exchange.gather_decompositions(owned),
            "health": self._health.totals(),
            "damping": self._adapter.damping if self._adapter is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any], *, timeout: float = STATE_TIMEOUT_S) -> None:
        """Restore :meth:`state_dict`, saved on any number of ranks.

        Each rank keeps the factors of the layers it owns and the decompositions of the layers it works on, so the
        run continues exactly as it would have. Decompositions that are missing or do not fit (another
        ``compute_method``) are recomputed by their new owners at the next step. Collective, like
        :meth:`state_dict`: every rank loads the same state (a rank that does not call it makes the callers raise
        after `timeout` seconds).
        """
        require_every_rank(self.comm, "load_state_dict()", timeout)
        factors = state_dict["factors"]
        restore_factors(self._states, factors, self._exchange, self._factor_dtype)
        saved = state_dict.get("decompositions", {}) if state_dict.get("compute_method") == self.method.name else {}
        worked = set(self._plan.layers_worked_by(self.comm.rank))
        missing = restore_decompositions(self._states, saved, worked, self._exchange, set(factors))
        self.steps = int(state_dict["steps"])
        self._health.counters.update(state_dict.get("health", {}))
        if self._adapter is not None and state_dict.get("damping") is not None:
            self._adapter.damping = float(state_dict["damping"])
        self._capturing = self._is_factor_step(self.steps)
        self._force_inverse = self._any_rank(missing)


def _squeeze(factor: torch.Tensor | None) -> torch.Tensor:
    """Drop the block dimension of a single-block factor."""
    assert factor is not None
    return factor[0] if factor.shape[0] == 1 else factor
