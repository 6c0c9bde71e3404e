"""The training loop: epochs of (micro-batches -> backward -> K-FAC -> optimizer), validation, metrics, checkpoints.

One loop serves K-FAC and the baselines (``kfac.enabled: false``), one process or many.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app import run_report
from kfac_dist.app.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_latest_usable,
    restore_rng_state,
    save_checkpoint,
)
from kfac_dist.app.components import (
    build_data,
    build_network,
    build_optimizer,
    build_preconditioner,
    make_communicator,
    resolve_device,
    wrap_model,
)
from kfac_dist.app.config import Config
from kfac_dist.app.config.schedules import learning_rate
from kfac_dist.app.env import RunEnv
from kfac_dist.app.metrics import MetricsLogger
from kfac_dist.app.nonfinite import NonFiniteGuard
from kfac_dist.app.preemption import StopSignals
from kfac_dist.app.resume import apply_hyperparameters, check_resumable, hyperparameters, identity
from kfac_dist.app.run_report import HealthWatch, Progress, SpanTimer, startup_block
from kfac_dist.comm import Communicator
from kfac_dist.entries import CATEGORIES as KFAC_CATEGORIES


@dataclass
class RunResult:
    """Where a run ended."""

    epochs: int
    steps: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Why the run stopped early with a checkpoint (e.g. "SIGTERM on 1 of 2 ranks"); None: it ran to its end.
    stopped_by: str | None = None


@dataclass
class Position:
    """How far training got: the epoch in progress, optimizer steps done in it, and in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.training.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.training.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """One run of a config on this rank (the process group, if any, is already started)."""

    def __init__(self, cfg: Config, env: RunEnv, stop: StopSignals | None = None) -> None:
        if cfg.training.amp == "fp16" and not torch.cuda.is_available():
            raise ValueError("training.amp: 'fp16' needs CUDA; allowed on the CPU: none, bf16")
        self.cfg, self.env = cfg, env
        self.device = resolve_device(cfg, env)
        self.comm: Communicator = make_communicator(cfg)
        self.loaders, num_classes = build_data(cfg, env, self.device)
        self.model = build_network(cfg, num_classes, self.device)
        self.wrapped, self.sync = wrap_model(self.model, self.comm, self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.training.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optimizer.label_smoothing)
        self.steps_per_epoch = len(self.loaders.train) // cfg.training.accumulation_steps
        if self.steps_per_epoch < 1:
            raise ValueError("data.batch_size x training.accumulation_steps is larger than this rank's training shard")
        self.lr = learning_rate(cfg, 0.0, env.world_size)
        self.pre: KFACPreconditioner | None = build_preconditioner(
            cfg, self.wrapped, self.comm, self.steps_per_epoch, lambda _step: self.lr, self.scaler
        )
        self.position = Position()
        self.resume_changes: list[str] = []
        self.run_dir = Path(cfg.logging.dir)
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.is_main = env.rank == 0
        self.kfac_timer = SpanTimer(self.device)
        total = self.steps_per_epoch * cfg.training.epochs
        self.progress = Progress(
            epochs=cfg.training.epochs,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=min(total, cfg.training.max_steps or total),
            enabled=self.is_main,
            bar=cfg.logging.progress_bar and sys.stderr.isatty(),
        )
        self.health = HealthWatch(env.rank, {})
        self.stop = stop or StopSignals()  # not installed: never set
        self.stopped_by: str | None = None
        self._saved_step: int | None = None
        self.nonfinite = NonFiniteGuard(
            policy=cfg.training.nonfinite,
            max_skips=cfg.training.nonfinite_max_skips,
            comm=self.comm,
            device=self.device,
            watch_gradients=self.scaler is None,  # the scaler skips steps whose gradients overflow itself
            kfac_count=lambda: self.pre.health()["nonfinite_gradient"] if self.pre is not None else 0,
            last_checkpoint=lambda: latest_checkpoint(self.checkpoint_dir),
            announce=self._announce,
        )

    def _announce(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, str]:
        return identity(self.cfg)

    def save(self) -> None:
        """Checkpoint (collective: K-FAC's state is gathered from its owners; rank 0 writes atomically).

        Only after clean steps and of a finite state: :class:`NonFiniteError` otherwise, on every rank.
        """
        self.nonfinite.check(self.position.global_step)
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": [self.position.epoch, self.position.step_in_epoch, self.position.global_step],
            "rng": capture_rng_state(),
        }
        if self.pre is not None:
            state["kfac"] = self.pre.state_dict(timeout=self.cfg.comm.timeout_s)  # ranks may arrive far apart
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        self.nonfinite.check_state(state, self.position.global_step)
        if self.is_main:
            save_checkpoint(
                self.checkpoint_dir,
                state,
                epoch=self.position.epoch,
                step=self.position.global_step,
                keep=self.cfg.checkpoint.keep,
                meta=self._meta(),
            )
        self.comm.barrier()
        self._saved_step = self.position.global_step

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint ``checkpoint.resume`` names ("auto": the newest, if any); return its path.

        The checkpoint gives the state (weights, optimizer buffers, K-FAC factors, RNG, position), the config every
        hyperparameter (:mod:`kfac_dist.app.resume`); a checkpoint of another model, data set or optimizer type is
        refused with a :class:`ConfigError`. ``self.resume_changes`` lists the optimizer values the config changed.
        """
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":  # the newest usable one: a damaged newest file is reported and passed over
            found = load_latest_usable(self.checkpoint_dir, report=self._announce)
            if found is None:
                return None
            path, payload = found
        else:  # named explicitly: it must be usable
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint.resume: no checkpoint file at {path}")
            payload = load_checkpoint(path)
        state = payload["state"]
        check_resumable(payload.get("meta", {}), state, self.cfg, path)
        self.model.load_state_dict(state["model"])
        configured = hyperparameters(self.optimizer)
        self.optimizer.load_state_dict(state["optimizer"])  # restores the checkpoint's hyperparameters too...
        self.resume_changes = apply_hyperparameters(self.optimizer, configured)  # ... so the config's go back
        if self.pre is not None and "kfac" in state:
            self.pre.load_state_dict(state["kfac"], timeout=self.cfg.comm.timeout_s)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.position = Position(*state["position"])
        return path

    # ------------------------------------------------------------------------------------------- training
    def _micro_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The epoch's optimizer steps, each a list of ``accumulation_steps`` micro-batches on the device."""
        k = self.cfg.training.accumulation_steps
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for x, y in self.loaders.train:
            group.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
            if len(group) == k:
                yield group
                group = []

    def _train_step(self, group: list[tuple[torch.Tensor, torch.Tensor]], sums: torch.Tensor) -> None:
        """One optimizer step; adds (loss sum, correct, examples) to ``sums``, on the device.

        No host sync, except with ``training.nonfinite=skip``, which checks the step before applying it and drops
        a non-finite one (no update, nothing added to ``sums``).
        """
        k = len(group)
        step_sums = torch.zeros_like(sums)
        self.optimizer.zero_grad(set_to_none=True)
        for index, (x, y) in enumerate(group):
            no_sync = getattr(self.wrapped, "no_sync", None)
            context = no_sync() if no_sync is not None and index < k - 1 else contextlib.nullcontext()
            with context:
                with _autocast(self.cfg, self.device):
                    output = self.wrapped(x)
                    loss = self.criterion(output, y)
                scaled = loss / k
                to_backward = self.scaler.scale(scaled) if self.scaler is not None else scaled
                if self.pre is not None:  # kfac.fisher=mc: the sampled pass on factor steps, then the same backward
                    self.pre.backward(to_backward, output)
                else:
                    to_backward.backward()
            step_sums[0] += loss.detach() * y.numel()
            step_sums[1] += (output.argmax(1) == y).sum()
            step_sums[2] += y.numel()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.sync.average(self.model)
        if self.pre is not None:
            with self.kfac_timer.span():
                self.pre.step()
        grad_norm = None
        if self.cfg.training.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        elif self.nonfinite.skipping:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if not self.nonfinite.admit(step_sums[0], grad_norm, self.position.global_step + 1):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # ends the step its unscale_ began
            return
        sums += step_sums
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.pre is not None and self.pre.adaptation_due:
            self._adapt_damping(group, step_sums)

    def _adapt_damping(self, group: list[tuple[torch.Tensor, torch.Tensor]], step_sums: torch.Tensor) -> None:
        """kfac.adaptive_damping: the step's loss against the same batch's loss after the update (one forward).

        The extra forward runs in training mode, as the step's did; the buffers it changes (batch-norm running
        statistics) are put back.
        """
        assert self.pre is not None
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        with torch.no_grad(), _autocast(self.cfg, self.device):
            after = sum(self.criterion(self.wrapped(x), y) * y.numel() for x, y in group)
            for buffer, saved in buffers:
                buffer.copy_(saved)
        self.pre.adapt_damping(step_sums[0] / step_sums[2], after / step_sums[2])

    def _set_lr(self) -> None:
        epoch = self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch
        self.lr = learning_rate(self.cfg, epoch, self.env.world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float]:
        """(loss, top-1, top-5) over the whole validation set, summed over ranks (one host read at the end)."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for x, y in self.loaders.val:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with _autocast(self.cfg, self.device):
                output = self.model(x).float()
            top5 = output.topk(min(5, output.shape[1]), dim=1).indices
            sums[0] += nn.functional.cross_entropy(output, y, reduction="sum")
            sums[1] += (top5[:, 0] == y).sum()
            sums[2] += (top5 == y[:, None]).any(1).sum()
            sums[3] += y.numel()
        self.model.train()
        self.comm.allreduce(sums, average=False, category=run_report.METRICS).wait()
        loss, top1, top5_hits, count = run_report.host_values(sums)
        count = max(count, 1.0)
        return loss / count, top1 / count, top5_hits / count

    def run(self) -> RunResult:
        """Train to ``training.epochs`` (or ``training.max_steps``), validating and checkpointing as configured."""
        cfg = self.cfg
        resumed = self.maybe_resume()
        if self.is_main:
            block = startup_block(
                cfg,
                comm=self.comm,
                device=self.device,
                model=self.model,
                pre=self.pre,
                steps_per_epoch=self.steps_per_epoch,
            )
            print(block, flush=True)
        if resumed is not None and self.is_main:
            print(f"resumed from {resumed} at epoch {self.position.epoch}, step {self.position.global_step}")
            if self.resume_changes:
                print(f"the config's optimizer values replace the checkpoint's: {', '.join(self.resume_changes)}")
        self.health = HealthWatch(self.env.rank, self.pre.health() if self.pre is not None else {})  # after resume
        self.nonfinite.rebase(self.position.global_step)
        start = time.perf_counter()
        history: list[dict[str, Any]] = []
        with MetricsLogger(
            self.run_dir,
            csv_enabled=cfg.logging.csv,
            tensorboard=cfg.logging.tensorboard,
            enabled=self.is_main,
            keep_through_step=self.position.global_step,  # rows of a rerun or of steps after the checkpoint go
        ) as metrics:
            while self.position.epoch < cfg.training.epochs and not self._max_steps_reached():
                row = self._run_epoch()
                if row is None:
                    break  # stopped mid-epoch by a signal, checkpoint written
                history.append(row)
                metrics.log_epoch(row)
                if self._unfinished() and self._stop_agreed():
                    break
        last = history[-1] if history else {}
        nan = float("nan")
        return RunResult(
            epochs=self.position.epoch,
            steps=self.position.global_step,
            train_loss=last.get("train_loss", nan),
            val_loss=last.get("val_loss", nan),
            val_top1=last.get("val_top1", nan),
            val_top5=last.get("val_top5", nan),
            seconds=time.perf_counter() - start,
            history=history,
            stopped_by=self.stopped_by,
        )

    def _max_steps_reached(self) -> bool:
        return self.cfg.training.max_steps is not None and self.position.global_step >= self.cfg.training.max_steps

    def _unfinished(self) -> bool:
        return self.position.epoch < self.cfg.training.epochs and not self._max_steps_reached()

    def _stop_agreed(self) -> bool:
        """Collective, at a step boundary: if any rank got a stop signal, checkpoint here (once) and return True."""
        reason = self.stop.agreed(self.comm, self.device)
        if reason is None:
            return False
        self.stopped_by = reason
        if self._saved_step != self.position.global_step:
            self.save()
        return True

    def _run_epoch(self) -> dict[str, Any] | None:
        """The rest of the current epoch (up to ``training.max_steps``): train, validate, report, checkpoint.

        Returns the epoch's metrics row, or None when a stop signal ended the epoch early (after a checkpoint).
        """
        epoch_start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        first, kfac_seconds = self.position.step_in_epoch, 0.0
        self.loaders.train_sampler.set_epoch(self.position.epoch)
        self.progress.start_epoch(self.position.global_step)
        for index, group in enumerate(self._micro_batches()):
            if index < first:
                continue  # resumed mid-epoch: these steps were already taken
            self._set_lr()
            self._train_step(group, sums)
            self.position.step_in_epoch += 1
            self.position.global_step += 1
            logged = self.position.global_step % self.cfg.training.log_every_steps == 0
            if logged:
                kfac_seconds += self._log_interval(sums)
            if self._max_steps_reached() or self.position.step_in_epoch == self.steps_per_epoch:
                break  # the epoch's end below validates, checkpoints and checks for a stop signal
            if logged and self._stop_agreed():
                self.progress.end_epoch()
                return None
            if self._step_checkpoint_due():
                self.save()
        self.progress.end_epoch()
        self.comm.allreduce(sums, average=False, category=run_report.METRICS).wait()
        train = run_report.host_values(sums)
        self.nonfinite.check(self.position.global_step)
        kfac_seconds += self.kfac_timer.collect()
        self._check_health()
        val = self.validate()
        steps = self.position.step_in_epoch - first
        row = self._epoch_row(train, val, time.perf_counter() - epoch_start, steps, kfac_seconds)
        complete = self.position.step_in_epoch >= self.steps_per_epoch
        if self.is_main:
            where = "" if complete else f" (stopped at training.max_steps={self.cfg.training.max_steps})"
            print(
                f"epoch {self.position.epoch + 1}/{self.cfg.training.epochs}{where}: "
                f"train loss {row['train_loss']:.4f}, val loss {val[0]:.4f}, top-1 {val[1]:.4f}, "
                f"top-5 {val[2]:.4f}, {row['epoch_seconds']:.1f} s",
                flush=True,
            )
        if complete:
            self.position.epoch += 1
            self.position.step_in_epoch = 0
        if self._checkpoint_due() or self._step_checkpoint_due():
            self.save()
        return row

    def _log_interval(self, sums: torch.Tensor) -> float:
        """The periodic log line (rank 0) and fallback check: one host read; returns the interval's K-FAC seconds."""
        values = run_report.host_values(sums)  # synchronises the device, so the K-FAC events can be read
        kfac_seconds = self.kfac_timer.collect()
        self.progress.log(
            epoch=self.position.epoch,
            step_in_epoch=self.position.step_in_epoch,
            global_step=self.position.global_step,
            sums=values,
            lr=self.lr,
            kfac_seconds=kfac_seconds if self.pre is not None else None,
        )
        self._check_health()
        self.nonfinite.check(self.position.global_step)  # training.nonfinite=stop: rides on this interval's read
        return kfac_seconds

    def _check_health(self) -> None:
        if self.pre is not None:
            self.health.check(self.pre.health(), self.position.global_step)

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every is not None and self.position.global_step % every == 0

    def _checkpoint_due(self) -> bool:
        """Whether an epoch's end (or the ``training.max_steps`` stop) saves; never with ``every_epochs`` null."""
        every = self.cfg.checkpoint.every_epochs
        if every is None:
            return False
        ended = self.position.epoch == self.cfg.training.epochs or self._max_steps_reached()
        return ended or self.position.epoch % every == 0

    def _epoch_row(
        self, train: list[float], val: tuple[float, ...], seconds: float, steps: int, kfac_seconds: float
    ) -> dict[str, Any]:
        count = max(train[2], 1.0)
        stats = self.comm.stats()
        sent = sum(stats.get(c, {}).get("sent", 0) for c in KFAC_CATEGORIES)
        received = sum(stats.get(c, {}).get("received", 0) for c in KFAC_CATEGORIES)
        damping = self.pre.damping if self.pre is not None else None
        return {
            "epoch": self.position.epoch + 1,
            "step": self.position.global_step,
            "train_loss": train[0] / count,
            "train_accuracy": train[1] / count,
            "val_loss": val[0],
            "val_top1": val[1],
            "val_top5": val[2],
            "lr": self.lr,
            "damping": damping,
            "epoch_seconds": seconds,
            "step_seconds": seconds / max(steps, 1),
            "kfac_step_seconds": kfac_seconds / max(steps, 1),
            "bytes_sent": sent,
            "bytes_received": received,
        }
