"""The built-in lockstep training loop, written on dtrain's public API and nothing else.

Every rank trains the same steps on its share of the same global batch (`ResumableSampler`); the
`Snapshotter` resumes, saves when due, and on a preemption saves the current step on every rank and
raises `dtrain.Preempted`. What this loop does, a loop of your own can do: see the README's example.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dtrain.config import Config, check_resume_config
from dtrain.data import collate, share_bounds
from dtrain.dist import DistContext
from dtrain.progress import ProgressLog
from dtrain.sampler import ResumableSampler
from dtrain.snapshotter import Snapshotter
from dtrain.state import seed_all
from dtrain.storage import Storage
from dtrain.task import Task

logger = logging.getLogger(__name__)

BatchHook = Callable[[int, torch.Tensor], None]
"""Called with (step, sample ids this rank trains on) before each step; for ledgers and tests."""

MODEL, OPTIMIZER, SCHEDULER, SAMPLER, PROGRESS = "model", "optimizer", "scheduler", "sampler", "progress"
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
        self.ddp = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        self.optimizer = task.build_optimizer(self.model.parameters(), task.options)
        self.scheduler = task.build_scheduler(self.optimizer, task.options) if task.build_scheduler else None
        self.train_data, self.eval_data = task.build_data(task.options)
        self.sampler = ResumableSampler(len(self.train_data), cfg.train.global_batch_size, cfg.train.seed,
                                        ctx.rank, ctx.world_size, strict=not allow_config_change)
        self.progress = {"samples_seen": 0}
        self.state: dict[str, Any] = {MODEL: self.model, OPTIMIZER: self.optimizer, SAMPLER: self.sampler,
                                      PROGRESS: self.progress}
        if self.scheduler is not None:
            self.state[SCHEDULER] = self.scheduler
        self.snap = Snapshotter(run_dir, seed=cfg.train.seed, hparams=cfg.to_dict(), storage=storage,
                                **dataclasses.asdict(cfg.snapshot))
        self.log = progress or ProgressLog(None, cfg.train.steps, 0, enabled=False, every=1)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.last_loss: float | None = None

    def fit(self) -> TrainResult:
        resumed_from = self.resume()
        batches = iter(self.sampler)
        while self.step < self.cfg.train.steps:
            loss = self.train_step(next(batches))
            self.step += 1
            self.sampler.consumed(self.step)
            self.after_step(loss)
            self.snap.step(self.step, self.state, metrics=self.evaluate)  # may raise dtrain.Preempted
        self.snap.close(self.step, self.state, metrics=self.evaluate)
        self.log.close()
        logger.info("finished at step %d  %s", self.step, "  ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))
        return TrainResult(self.step, dict(self.metrics), resumed_from)

    def resume(self) -> int | None:
        self.step = self.snap.restore(self.state, check_hparams=self.check_config)
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
        for change in changes.defining:
            logger.warning("config change accepted by --allow-config-change: %s", change)
        for change in changes.applied:
            logger.info("config change applied on resume: %s", change)

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, ids: list[int]) -> torch.Tensor:
        """One optimizer step on this rank's share `ids`; returns the share's summed loss."""
        mine = torch.tensor(ids, dtype=torch.int64)
        if self.on_batch is not None:
            self.on_batch(self.step, mine)
        global_len = self.sampler.global_batch_len(self.step + 1)
        inputs, targets = (t.to(self.ctx.device) for t in collate(self.train_data, mine))
        self.ddp.train()
        losses = self.task.per_sample_loss(self.ddp(inputs), targets)
        # DDP averages gradients over ranks; scaling by world/len(batch) makes that average the
        # mean over the global batch, whatever each rank's share.
        loss = losses.sum() * (self.ctx.world_size / global_len)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.progress["samples_seen"] += global_len
        return losses.detach().sum() / global_len

    def after_step(self, loss: torch.Tensor) -> None:
        step, train = self.step, self.cfg.train
        if train.eval_every_steps and step % train.eval_every_steps == 0:
            self.evaluate()
        if step % train.log_every_steps == 0:
            self.log_step(loss)
        self.log.step(step, {} if self.last_loss is None else {"loss": self.last_loss})

    # -- evaluation, logging -----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean per-sample loss over the eval set, each rank taking a contiguous share (once a step)."""
        if self.eval_data is None or len(self.eval_data) == 0 or self.metrics.get("metrics_step") == self.step:
            return self.metrics
        start, end = share_bounds(len(self.eval_data), self.ctx.rank, self.ctx.world_size)
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        self.model.eval()
        with torch.no_grad():
            for lo in range(start, end, self.cfg.train.global_batch_size):
                ids = torch.arange(lo, min(end, lo + self.cfg.train.global_batch_size))
                inputs, targets = (t.to(self.ctx.device) for t in collate(self.eval_data, ids))
                total[0] += self.task.per_sample_loss(self.model(inputs), targets).double().sum()
                total[1] += len(ids)
        self.model.train()
        dist.all_reduce(total)
        self.metrics = {"val_loss": float(total[0] / total[1]), "metrics_step": self.step}
        self.log.record({"step": self.step, **self.metrics})
        return self.metrics

    def log_step(self, loss: torch.Tensor) -> None:
        """`loss`: this rank's share of the global mean; summed over ranks it is the global mean."""
        total = loss.double().clone()
        dist.all_reduce(total)
        self.last_loss = float(total)
        cursor = self.sampler.cursor
        self.log.record({"step": self.step, "train_loss": self.last_loss,
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "samples_seen": self.progress["samples_seen"], "epoch": cursor.epoch,
                              "world_size": self.ctx.world_size})
