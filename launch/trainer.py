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
from kfac_dist.comm import Communicator
from kfac_dist.options import resolve
from launch.checkpoint import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from launch.components import (
    build_data,
    build_network,
    build_optimizer,
    build_preconditioner,
    make_communicator,
    resolve_device,
    wrap_model,
)
from launch.config import Config, config_fingerprint
from launch.config.schedules import learning_rate
from launch.env import RunEnv
from launch.metrics import MetricsLogger

KFAC_CATEGORIES = ("factor_reduce", "decomposition_broadcast", "gradient_broadcast")


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

    def __init__(self, cfg: Config, env: RunEnv) -> None:
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
        self.run_dir = Path(cfg.logging.dir)
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.is_main = env.rank == 0

    # ------------------------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, str]:
        return {"model": self.cfg.model.name, "config_fingerprint": config_fingerprint(self.cfg)}

    def save(self) -> None:
        """Checkpoint (collective: K-FAC's state is gathered from its owners; rank 0 writes atomically)."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": [self.position.epoch, self.position.step_in_epoch, self.position.global_step],
            "rng": capture_rng_state(),
        }
        if self.pre is not None:
            state["kfac"] = self.pre.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
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

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint ``checkpoint.resume`` names ("auto": the newest, if any); return its path."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        path = latest_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint.resume: no checkpoint file at {path}")
        state = load_checkpoint(path, expected=self._meta())["state"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.pre is not None and "kfac" in state:
            self.pre.load_state_dict(state["kfac"])
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

    def _train_step(self, group: list[tuple[torch.Tensor, torch.Tensor]], sums: torch.Tensor) -> float:
        """One optimizer step; returns the seconds spent in ``pre.step()``."""
        k = len(group)
        self.optimizer.zero_grad(set_to_none=True)
        for index, (x, y) in enumerate(group):
            no_sync = getattr(self.wrapped, "no_sync", None)
            context = no_sync() if no_sync is not None and index < k - 1 else contextlib.nullcontext()
            with context:
                with _autocast(self.cfg, self.device):
                    output = self.wrapped(x)
                    loss = self.criterion(output, y)
                scaled = loss / k
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            sums += torch.stack(
                [loss.detach().float() * len(y), (output.argmax(1) == y).sum().float(), torch.tensor(float(len(y)))]
            ).to(sums.device)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.sync.average(self.model)
        kfac_seconds = 0.0
        if self.pre is not None:
            start = time.perf_counter()
            self.pre.step()
            kfac_seconds = time.perf_counter() - start
        if self.cfg.training.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return kfac_seconds

    def _set_lr(self) -> None:
        epoch = self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch
        self.lr = learning_rate(self.cfg, epoch, self.env.world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float]:
        """(loss, top-1, top-5) over the whole validation set, summed over ranks."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for x, y in self.loaders.val:
            x, y = x.to(self.device), y.to(self.device)
            with _autocast(self.cfg, self.device):
                output = self.model(x).float()
            top5 = output.topk(min(5, output.shape[1]), dim=1).indices
            sums += torch.tensor(
                [
                    nn.functional.cross_entropy(output, y, reduction="sum").item(),
                    (top5[:, 0] == y).sum().item(),
                    (top5 == y[:, None]).any(1).sum().item(),
                    len(y),
                ],
                dtype=torch.float64,
            )
        self.model.train()
        self.comm.allreduce(sums, average=False, category="metrics").wait()
        count = max(sums[3].item(), 1.0)
        return sums[0].item() / count, sums[1].item() / count, sums[2].item() / count

    def run(self) -> RunResult:
        """Train to ``training.epochs`` (or ``training.max_steps``), validating and checkpointing as configured."""
        cfg = self.cfg
        resumed = self.maybe_resume()
        if resumed is not None and self.is_main:
            print(f"resumed from {resumed} at epoch {self.position.epoch}, step {self.position.global_step}")
        start = time.perf_counter()
        history: list[dict[str, Any]] = []
        val = (float("nan"),) * 3
        train_loss = float("nan")
        with MetricsLogger(
            self.run_dir, csv_enabled=cfg.logging.csv, tensorboard=cfg.logging.tensorboard, enabled=self.is_main
        ) as metrics:
            while self.position.epoch < cfg.training.epochs:
                epoch_start = time.perf_counter()
                sums = torch.zeros(3, dtype=torch.float64)
                kfac_seconds, steps_run = 0.0, 0
                self.loaders.train_sampler.set_epoch(self.position.epoch)
                stopped = False
                for index, group in enumerate(self._micro_batches()):
                    if index < self.position.step_in_epoch:
                        continue  # resumed mid-epoch: these steps were already taken
                    self._set_lr()
                    kfac_seconds += self._train_step(group, sums)
                    steps_run += 1
                    self.position.step_in_epoch += 1
                    self.position.global_step += 1
                    self._progress(sums)
                    if cfg.training.max_steps is not None and self.position.global_step >= cfg.training.max_steps:
                        stopped = True
                        break
                if stopped:
                    self.save()
                    break
                self.comm.allreduce(sums, average=False, category="metrics").wait()
                train_loss = sums[0].item() / max(sums[2].item(), 1.0)
                val = self.validate()
                row = self._epoch_row(sums, val, time.perf_counter() - epoch_start, steps_run, kfac_seconds)
                history.append(row)
                metrics.log_epoch(row)
                if self.is_main:
                    print(
                        f"epoch {self.position.epoch + 1}/{cfg.training.epochs}: train loss {train_loss:.4f}, "
                        f"val loss {val[0]:.4f}, top-1 {val[1]:.4f}, top-5 {val[2]:.4f}, "
                        f"{row['epoch_seconds']:.1f} s",
                        flush=True,
                    )
                self.position.epoch += 1
                self.position.step_in_epoch = 0
                if self._checkpoint_due():
                    self.save()
        return RunResult(
            epochs=self.position.epoch,
            steps=self.position.global_step,
            train_loss=train_loss,
            val_loss=val[0],
            val_top1=val[1],
            val_top5=val[2],
            seconds=time.perf_counter() - start,
            history=history,
        )

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_epochs
        last = self.position.epoch == self.cfg.training.epochs
        return last or (every is not None and self.position.epoch % every == 0)

    def _epoch_row(
        self, sums: torch.Tensor, val: tuple[float, ...], seconds: float, steps: int, kfac_seconds: float
    ) -> dict[str, Any]:
        count = max(sums[2].item(), 1.0)
        stats = self.comm.stats()
        sent = sum(stats.get(c, {}).get("sent", 0) for c in KFAC_CATEGORIES)
        received = sum(stats.get(c, {}).get("received", 0) for c in KFAC_CATEGORIES)
        damping = resolve("damping", self.pre.damping, self.pre.steps) if self.pre is not None else None
        return {
            "epoch": self.position.epoch + 1,
            "step": self.position.global_step,
            "train_loss": sums[0].item() / count,
            "train_accuracy": sums[1].item() / count,
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

    def _progress(self, sums: torch.Tensor) -> None:
        if not (self.is_main and self.cfg.logging.progress_bar):
            return
        if self.position.step_in_epoch % self.cfg.training.log_every_steps and (
            self.position.step_in_epoch != self.steps_per_epoch
        ):
            return
        done = self.position.step_in_epoch / self.steps_per_epoch
        bar = "#" * int(30 * done)
        loss = sums[0].item() / max(sums[2].item(), 1.0)
        sys.stderr.write(
            f"\repoch {self.position.epoch + 1} [{bar:<30}] {self.position.step_in_epoch}/{self.steps_per_epoch} "
            f"loss {loss:.4f}"
        )
        if self.position.step_in_epoch == self.steps_per_epoch:
            sys.stderr.write("\n")
        sys.stderr.flush()
