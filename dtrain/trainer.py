"""The built-in lockstep training loop, written on dtrain's public API and nothing else.

Every rank trains the same steps on its share of the same global batch (`ResumableSampler`); the
`Snapshotter` resumes, saves when due, and on a preemption saves the current step on every rank and
raises `dtrain.Preempted`. What this loop does, a loop of your own can do: see the README's example.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dtrain.config import Config, check_resume_config
from dtrain.data import collate, rank_share, share_bounds
from dtrain.dist import DistContext
from dtrain.loader import SampleReadError, StepBatches, micro_batch_count, micro_batches
from dtrain.parallel import Parallel
from dtrain.precision import MixedPrecision
from dtrain.progress import ProgressLog
from dtrain.sampler import ResumableSampler
from dtrain.snapshotter import Snapshotter
from dtrain.state import seed_all
from dtrain.storage import Storage
from dtrain.task import Task, resolve

logger = logging.getLogger(__name__)

BatchHook = Callable[[int, torch.Tensor], None]
"""Called with (step, sample ids this rank trains on) before each step; for ledgers and tests."""

MODEL, OPTIMIZER, SCHEDULER, SAMPLER, PROGRESS, PRECISION = (
    "model", "optimizer", "scheduler", "sampler", "progress", "precision")
"""The trainer's state keys in a snapshot (export reads `model`)."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    metrics: dict[str, float]
    resumed_from: int | None


class Trainer:
    """Builds the task's objects and runs the loop to `train.steps`, resuming from the run dir.

    Example::

        ctx = init_distributed(cfg)
        result = Trainer(cfg, load_task(cfg.task), Path("runs/x"), ctx).fit()
    """

    def __init__(self, cfg: Config, task: Task, run_dir: Path, ctx: DistContext, progress: ProgressLog | None = None,
                 on_batch: BatchHook | None = None, allow_config_change: bool = False,
                 storage: Storage | None = None) -> None:
        self.cfg, self.task, self.ctx = cfg, task, ctx
        self.on_batch = on_batch
        self.allow_config_change = allow_config_change
        seed_all(cfg.train.seed, 0, 0)  # identical init on every rank
        self.model = task.build_model(task.options).to(ctx.device)
        blocks = resolve("task.shard", cfg.task.shard) if cfg.task.shard else None
        self.parallel = Parallel.wrap(self.model, cfg.dist.strategy, ctx.device, cfg.train.precision, blocks)
        self.optimizer = task.build_optimizer(self.model.parameters(), task.options)
        self.scheduler = task.build_scheduler(self.optimizer, task.options) if task.build_scheduler else None
        self.amp = MixedPrecision(cfg.train.precision, ctx.device, cfg.train.grad_clip_norm)
        self.train_data, self.eval_data = task.build_data(task.options)
        self.sampler = ResumableSampler(len(self.train_data), cfg.train.global_batch_size, cfg.train.seed,
                                        ctx.rank, ctx.world_size, strict=not allow_config_change)
        self.progress = {"samples_seen": 0}
        self.state: dict[str, Any] = {MODEL: self.model, OPTIMIZER: self.optimizer, SAMPLER: self.sampler,
                                      PROGRESS: self.progress, PRECISION: self.amp}
        if self.scheduler is not None:
            self.state[SCHEDULER] = self.scheduler
        self.snap = Snapshotter(run_dir, seed=cfg.train.seed, hparams=cfg.to_dict(), storage=storage,
                                **dataclasses.asdict(cfg.snapshot))
        self.log = progress or ProgressLog(None, cfg.train.steps, 0, enabled=False, every=1)
        self.timer = StepTimer()
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.last_loss: float | None = None

    def fit(self) -> TrainResult:
        resumed_from = self.resume()
        batches = iter(StepBatches(self.train_data, self.sampler, self.cfg.data, self.ctx.device, self.cfg.train.seed))
        self.timer = StepTimer()
        try:
            self.train_steps(batches)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):  # torch's words for a worker that died or broke its pipe
                raise
            raise self.worker_died(e) from e
        finally:
            del batches  # stops DataLoader workers now, not at garbage collection
        self.snap.close(self.step, self.state, metrics=self.evaluate)
        self.log.close()
        logger.info("finished at step %d  %s", self.step, "  ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))
        return TrainResult(self.step, dict(self.metrics), resumed_from)

    def train_steps(self, batches: Iterator[tuple[int, torch.Tensor, Any]]) -> None:
        while self.step < self.cfg.train.steps:
            step, ids, batch = self.next_batch(batches)
            loss, grad_norm = self.train_step(ids, batch)
            self.timer.trained(self.sampler.global_batch_len(step))
            self.step = step
            self.sampler.consumed(self.step)
            self.after_step(loss, grad_norm)
            self.snap.step(self.step, self.state, metrics=self.evaluate)  # may raise dtrain.Preempted

    def next_batch(self, batches: Iterator[tuple[int, torch.Tensor, Any]]) -> tuple[int, torch.Tensor, Any]:
        self.timer.waiting()
        step, ids, batch = next(batches)
        self.timer.ready()
        if self.on_batch is not None:
            self.on_batch(step - 1, ids)
        return step, ids, batch

    def worker_died(self, error: RuntimeError) -> SampleReadError:
        """The error for a DataLoader worker that died: torch reports it wherever the training process
        is when it notices (its SIGCHLD handler), so name the step trained or awaited and its samples."""
        awaited = rank_share(self.sampler.order.batch_at(self.sampler.cursor), self.ctx.rank,
                             self.ctx.world_size).tolist()
        return SampleReadError(
            f"a data worker failed while step {self.step + 1} (samples {awaited[:8]}"
            f"{'...' if len(awaited) > 8 else ''}) was read or trained; it may have been reading a later step: "
            f"{error}. Check the worker's memory and the dataset's reads, or set data.num_workers = 0")

    def resume(self) -> int | None:
        self.step = self.snap.restore(self.state, check_hparams=self.check_config)
        self.state[PRECISION] = self.amp
        if self.step == 0:
            seed_all(self.cfg.train.seed, 0, self.ctx.rank)
            logger.info("starting a new run at world size %d", self.ctx.world_size)
            return None
        self.metrics = dict(self.snap.metrics)
        return self.step

    def check_config(self, saved: dict[str, Any]) -> None:
        """Refuse (exit 2) a resume whose data order or model differs from the snapshot's, unless allowed;
        log every other change, which applies from here on."""
        changes = check_resume_config(saved, self.cfg, self.allow_config_change)
        if "precision" not in saved.get("train", {}):  # saved before dtrain had precision: no such state
            del self.state[PRECISION]
        for change in changes.defining:
            logger.warning("config change accepted by --allow-config-change: %s", change)
        for change in changes.applied:
            logger.info("config change applied on resume: %s", change)

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, ids: torch.Tensor, batch: Any) -> tuple[torch.Tensor, float | None]:
        """One optimizer step on this rank's share; returns its part of the global mean loss (summed
        over ranks it is the mean) and the gradient norm before clipping (measured on log steps
        and whenever clipping is on)."""
        global_len = self.sampler.global_batch_len(self.step + 1)
        # DDP averages gradients over ranks; scaling each summed loss by world/len(batch) makes that
        # average the mean over the global batch, whatever each rank's share or micro-batches.
        weight = self.ctx.world_size / global_len
        micro = self.cfg.train.micro_batch_size
        count = micro_batch_count(global_len, self.ctx.world_size, micro) if self.parallel.strategy == "fsdp" else 0
        pieces = micro_batches(batch, micro, count)
        self.parallel.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for i, piece in enumerate(pieces):
            inputs, targets = (t.to(self.ctx.device, non_blocking=True) for t in piece)
            # gradients are synchronized once, after the last micro-batch's backward
            with self.parallel.accumulating(last=i == len(pieces) - 1):
                with self.amp.autocast():
                    losses = self.task.per_sample_loss(self.parallel.module(inputs), targets)
                self.amp.backward(losses.sum() * weight)
            total += losses.detach().double().sum()
        measure = (self.step + 1) % self.cfg.train.log_every_steps == 0
        grad_norm = self.amp.step(self.optimizer, self.model.parameters(), measure_norm=measure)
        if self.scheduler is not None:
            self.scheduler.step()
        self.progress["samples_seen"] += global_len
        return total / global_len, grad_norm

    def after_step(self, loss: torch.Tensor, grad_norm: float | None) -> None:
        step, train = self.step, self.cfg.train
        if train.eval_every_steps and step % train.eval_every_steps == 0:
            self.evaluate()
        if step % train.log_every_steps == 0:
            self.log_step(loss, grad_norm)
        self.log.step(step, {} if self.last_loss is None else {"loss": self.last_loss})

    # -- evaluation, logging -----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean per-sample loss over the eval set, each rank taking a contiguous share (once a step).
        Every rank runs as many forwards, the last ones possibly empty: FSDP gathers in each."""
        if self.eval_data is None or len(self.eval_data) == 0 or self.metrics.get("metrics_step") == self.step:
            return self.metrics
        start, end = share_bounds(len(self.eval_data), self.ctx.rank, self.ctx.world_size)
        size = self.cfg.train.global_batch_size
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        self.model.eval()
        with torch.no_grad():
            for i in range(micro_batch_count(len(self.eval_data), self.ctx.world_size, size)):
                lo = start + i * size
                ids = torch.arange(lo, max(lo, min(end, lo + size)))
                inputs, targets = (t.to(self.ctx.device) for t in collate(self.eval_data, ids))
                with self.amp.autocast():
                    total[0] += self.task.per_sample_loss(self.model(inputs), targets).double().sum()
                total[1] += len(ids)
        self.model.train()
        dist.all_reduce(total)
        self.metrics = {"val_loss": float(total[0] / total[1]), "metrics_step": self.step}
        self.log.record({"step": self.step, **self.metrics})
        return self.metrics

    def log_step(self, loss: torch.Tensor, grad_norm: float | None) -> None:
        """`loss`: this rank's share of the global mean; summed over ranks it is the global mean.
        Times are rank 0's means per step over the steps since the last log line."""
        total = loss.double().clone()
        dist.all_reduce(total)
        self.last_loss = float(total)
        cursor = self.sampler.cursor
        row = {"step": self.step, "train_loss": self.last_loss, "lr": self.optimizer.param_groups[0]["lr"],
               "samples_seen": self.progress["samples_seen"], "epoch": cursor.epoch,
               "world_size": self.ctx.world_size, "grad_norm": grad_norm, **self.timer.window()}
        if self.amp.scaler.is_enabled():
            row["loss_scale"] = self.amp.scale
        self.log.record(row)


class StepTimer:
    """Splits wall time between waiting for data and training, for the log: is the input pipeline
    or the model the bottleneck?"""

    def __init__(self) -> None:
        self._mark = time.monotonic()
        self._wait = self._train = 0.0
        self._steps = self._samples = 0

    def waiting(self) -> None:
        """Training of the last step (its save and evaluation included) ended; a batch is awaited."""
        now = time.monotonic()
        self._train += now - self._mark
        self._mark = now

    def ready(self) -> None:
        now = time.monotonic()
        self._wait += now - self._mark
        self._mark = now

    def trained(self, samples: int) -> None:
        self._steps += 1
        self._samples += samples

    def window(self) -> dict[str, float]:
        """Means per step since the last call, then start a new window."""
        steps, busy = max(self._steps, 1), self._wait + self._train
        out = {"step_time_s": self._train / steps, "data_wait_s": self._wait / steps,
               "samples_per_s": self._samples / busy if busy > 0 else 0.0}
        self._wait = self._train = 0.0
        self._steps = self._samples = 0
        return out
