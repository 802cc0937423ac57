"""The lockstep training loop: every rank runs the same steps on its share of the same global batch.

The loop never touches paths: snapshots go through the `SnapshotManager`, metrics through the
`Reporter`. Per step it trains, then agrees with the other ranks (one small all-reduce) on
whether a preemption signal arrived and whether a snapshot is due, then evaluates and
snapshots when due. A preemption saves the current step, waits for its commit, records a
`{"event": "preempted", ...}` line in metrics.jsonl and raises `PreemptedError`, so the next
start resumes at exactly that step.
"""

from __future__ import annotations

import logging
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dtrain import __version__
from dtrain.config import Config, check_resume_config
from dtrain.data import GlobalOrder, collate, rank_share, share_bounds
from dtrain.dist import DistContext
from dtrain.errors import PreemptedError
from dtrain.report import Reporter
from dtrain.signals import PreemptionFlag
from dtrain.snapshot.manager import SnapshotManager
from dtrain.snapshot.reader import Restored
from dtrain.state import RNGState, TrainProgress, seed_all
from dtrain.storage import Storage
from dtrain.task import Task

logger = logging.getLogger(__name__)

BatchHook = Callable[[int, torch.Tensor], None]
"""Called with (step, sample ids this rank trains on) before each step; for ledgers and tests."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    metrics: dict[str, float]
    resumed_from: int | None


class Trainer:
    """Builds the task's objects and runs the loop to `train.steps`, resuming from the run dir.

    Example::

        ctx = init_distributed(cfg)
        result = Trainer(cfg, load_task(cfg.task), LocalStorage(run_dir), ctx).fit()
    """

    def __init__(self, cfg: Config, task: Task, storage: Storage, ctx: DistContext,
                 reporter: Reporter | None = None, preemption: PreemptionFlag | None = None,
                 on_batch: BatchHook | None = None, allow_config_change: bool = False) -> None:
        self.cfg, self.task, self.ctx = cfg, task, ctx
        self.allow_config_change = allow_config_change
        self.preemption = preemption or PreemptionFlag()
        self.on_batch = on_batch
        seed_all(cfg.train.seed, 0, 0)  # identical init on every rank
        self.model = task.build_model(task.options).to(ctx.device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        self.optimizer = task.build_optimizer(self.model.parameters(), task.options)
        self.scheduler = task.build_scheduler(self.optimizer, task.options) if task.build_scheduler else None
        self.train_data, self.eval_data = task.build_data(task.options)
        self.order = GlobalOrder(len(self.train_data), cfg.train.global_batch_size, cfg.train.seed)
        self.progress = TrainProgress()
        self.metrics: dict[str, float] = {}
        self.last_loss: float | None = None
        self.snapshots = SnapshotManager(storage, cfg.snapshot, ctx)
        self.reporter = reporter or Reporter(None, cfg.train.steps, 0, enabled=False, every=1)

    def fit(self) -> TrainResult:
        resumed_from = self.resume()
        self.preemption.install()  # from here on a signal means: save this step, then stop
        while self.progress.step < self.cfg.train.steps:
            started = time.perf_counter()
            self.after_step(self.train_step())
            # The whole iteration, evaluation and save included: what `every_steps = "auto"` weighs.
            self.snapshots.observe_iteration(time.perf_counter() - started)
        self.finish()
        self.preemption.uninstall()
        return TrainResult(self.progress.step, dict(self.metrics), resumed_from)

    # -- resume ------------------------------------------------------------------------------

    def resume(self) -> int | None:
        self.snapshots.prepare_run_dir()
        restored = self.snapshots.restore_latest(into={"model": self.model.state_dict()})
        if restored is None:
            seed_all(self.cfg.train.seed, 0, self.ctx.rank)
            logger.info("starting a new run at world size %d", self.ctx.world_size)
            return None
        self.check_config(restored.manifest.config)
        self.load(restored)
        m = restored.manifest
        how = "" if m.world_size == self.ctx.world_size else f", resharded from world size {m.world_size}"
        logger.info("resumed from snapshot step %d (saved at world size %d) at world size %d%s",
                    m.step, m.world_size, self.ctx.world_size, how)
        self.reporter.record({"event": "resume", "step": m.step, "saved_world_size": m.world_size,
                              "world_size": self.ctx.world_size})
        return m.step

    def check_config(self, saved: dict[str, Any]) -> None:
        """Refuse (exit 2) a resume whose data order or model differs from the snapshot's, unless allowed;
        log every other change, which applies from here on."""
        changes = check_resume_config(saved, self.cfg, self.allow_config_change)
        for change in changes.defining:
            logger.warning("config change accepted by --allow-config-change: %s", change)
        for change in changes.applied:
            logger.info("config change applied on resume: %s", change)

    def load(self, restored: Restored) -> None:
        objects = restored.objects
        self.model.load_state_dict(objects["model"])
        self.optimizer.load_state_dict(objects["optimizer"])
        if self.scheduler is not None and "scheduler" in objects:
            self.scheduler.load_state_dict(objects["scheduler"])
        self.progress.load_state_dict(objects["progress"])
        self.metrics = dict(restored.manifest.metrics)
        if restored.private is not None:
            RNGState().load_state_dict(restored.private["rng"])
        else:  # a new world size: saved streams have no owner, derive fresh ones reproducibly
            seed_all(self.cfg.train.seed, self.progress.step, self.ctx.rank)

    # -- one step ----------------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step on this rank's share; returns the share's summed loss and the global batch size."""
        batch = self.order.batch_at(self.progress.cursor)
        mine = rank_share(batch, self.ctx.rank, self.ctx.world_size)
        if self.on_batch is not None:
            self.on_batch(self.progress.step, mine)
        inputs, targets = (t.to(self.ctx.device) for t in collate(self.train_data, mine))
        self.ddp.train()
        losses = self.task.per_sample_loss(self.ddp(inputs), targets)
        # DDP averages gradients over ranks; scaling by world/len(batch) makes that average the
        # mean over the global batch, whatever each rank's share.
        loss = losses.sum() * (self.ctx.world_size / len(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.progress.step += 1
        self.progress.samples_seen += len(batch)
        self.progress.cursor = self.order.advance(self.progress.cursor)
        return losses.detach().sum(), len(batch)

    def after_step(self, loss: tuple[torch.Tensor, int]) -> None:
        step, cfg = self.progress.step, self.cfg
        # Every trigger that rests on this rank's clock or signals is agreed in one all-reduce (so is
        # the count under `every_steps = "auto"`, which each rank derives from its own timings).
        preempted, time_due, step_due = self.ctx.any(self.preemption.is_requested, self.snapshots.is_time_due(),
                                                     self.snapshots.is_step_due(step))
        epoch_end = cfg.snapshot.at_epoch_end and self.progress.cursor.offset == 0
        snapshot_due = step_due or time_due or epoch_end
        if (cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0) or snapshot_due:
            self.evaluate()
        if step % cfg.train.log_every_steps == 0:
            self.log_step(*loss)
        if preempted:
            self.preempt(step)
        if snapshot_due:
            self.save("time" if time_due else "epoch end" if epoch_end else "interval")
        self.reporter.step(step, {} if self.last_loss is None else {"loss": self.last_loss})

    def preempt(self, step: int) -> None:
        """Save this step, wait for its commit, record the event in metrics.jsonl, and stop."""
        received = self.ctx.exchange(f"preempted/{step}", signal_name(self.preemption.signum))
        self.save("preemption")
        result = self.snapshots.wait()
        ranks = [r for r, name in enumerate(received) if name]
        self.reporter.record({"event": "preempted", "step": step, "signal": received[ranks[0]] if ranks else None,
                              "signaled_ranks": ranks, "snapshot": result.path if result else None,
                              "world_size": self.ctx.world_size})
        raise PreemptedError(f"preempted at step {step}; its snapshot is committed, restart to resume")

    def finish(self) -> None:
        if self.snapshots.last_saved_step != self.progress.step:
            self.evaluate()
            self.save("end of run")
        self.snapshots.wait()
        self.reporter.close()
        logger.info("finished at step %d  %s", self.progress.step,
                    "  ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))

    # -- evaluation, logging, snapshots --------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean per-sample loss over the eval set, each rank taking a contiguous share."""
        if self.eval_data is None or len(self.eval_data) == 0:
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
        self.metrics = {"val_loss": float(total[0] / total[1]), "metrics_step": self.progress.step}
        self.reporter.record({"step": self.progress.step, **self.metrics})
        return self.metrics

    def log_step(self, loss_sum: torch.Tensor, batch_size: int) -> None:
        total = loss_sum.double().clone()
        dist.all_reduce(total)
        self.last_loss = float(total) / batch_size
        lr = self.optimizer.param_groups[0]["lr"]
        self.reporter.record({"step": self.progress.step, "train_loss": self.last_loss, "lr": lr,
                              "samples_seen": self.progress.samples_seen, "epoch": self.progress.cursor.epoch,
                              "world_size": self.ctx.world_size})

    def save(self, reason: str) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "progress": self.progress.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        meta = {"progress": self.progress.state_dict(), "metrics": self.metrics,
                "config": self.cfg.to_dict(), "versions": versions()}
        self.snapshots.save(self.progress.step, state, {"rng": RNGState().state_dict()}, meta, reason)


def signal_name(signum: int | None) -> str:
    """`SIGTERM` for 15; empty for no signal (this rank received none)."""
    return "" if signum is None else signal.Signals(signum).name


def versions() -> dict[str, str]:
    return {"dtrain": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
