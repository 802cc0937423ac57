"""`Snapshotter`: dtrain's snapshots, resume and preemption for a training loop of your own.

    snap = dtrain.Snapshotter("runs/x", every_steps=100, keep_last=3)  # any snapshot.* key as a keyword
    state = {"model": model, "optimizer": optimizer, "sampler": sampler, "extra": {"losses": []}}
    step = snap.restore(state)          # the newest committed snapshot that verifies, into `state`; 0 if none
    while step < total:
        ...forward, backward, optimizer.step()...
        step += 1
        snap.step(step, state)          # saves asynchronously when due; on SIGTERM/SIGUSR1 commits this
                                        # step on every rank and raises dtrain.Preempted (exit code 75)
    snap.close(step, state)             # saves the final step if it was not saved, waits for every commit

`state` maps names to objects with `state_dict()` / `load_state_dict()` (modules, optimizers,
schedulers, `ResumableSampler`, a GradScaler), or to tensors, numbers, strings, lists and dicts.
Tensors restore in place; plain lists and dicts are updated in place. Each rank's python, numpy,
torch and CUDA generators are saved too and restored at the same world size; at another world
size every rank re-derives them from `(seed, step, rank)`. The run dir is locked for the
Snapshotter's lifetime (rank 0 holds `RUN_DIR/.lock`): a second job on it fails at once.

It needs the process group initialized first (`torch.distributed.init_process_group`), or none
at world size 1, and reads rank and world size from it. Every method is collective: call it on
every rank at the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtrain.config import SnapshotConfig, config_from_dict
from dtrain.dist import DistContext, attach, solo_context
from dtrain.errors import ConfigError, Preempted
from dtrain.progress import MetricsLog
from dtrain.runlock import RunDirLock, RunDirLockedError
from dtrain.sampler import ResumableSampler
from dtrain.signals import PreemptionFlag, signal_name
from dtrain.snapshot import layout
from dtrain.snapshot.manager import SnapshotManager
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.policy import Progress, SavePolicy, YoungDaly, policies_from
from dtrain.snapshot.writer import SaveResult
from dtrain.state import RNG_KEY, RNGState, Stateful, make_sharded_state, seed_all, versions
from dtrain.storage import RunLocation, Storage, parse_run_dir

logger = logging.getLogger(__name__)

Metrics = dict[str, float] | Callable[[], dict[str, float]] | None
"""A snapshot's metrics (for best-K retention and `export --best`), or a function computing them
(an evaluation), called on every rank only when a snapshot is taken."""


class Snapshotter:
    """Committed, asynchronous, sharded snapshots of a training loop's state; exact resume."""

    def __init__(self, run_dir: str | Path, *, seed: int = 0, hparams: dict[str, Any] | None = None,
                 storage: Storage | None = None, **snapshot: Any) -> None:
        """`run_dir` is a local path or `s3://BUCKET/PREFIX` (then the lock and metrics.jsonl are kept
        in `RunLocation.local_dir`); `seed` re-derives the generators on a new world size; `hparams`
        are recorded in each snapshot; `storage` replaces where the snapshot bytes go."""
        self.cfg: SnapshotConfig = config_from_dict({"snapshot": snapshot}).snapshot
        location = parse_run_dir(run_dir) if isinstance(run_dir, str) else RunLocation(str(run_dir), Path(run_dir))
        self.run_dir = location.local_dir()
        self.seed = seed
        self.hparams = {**(hparams or {}), "snapshot": dataclasses.asdict(self.cfg)}
        self.ctx: DistContext = attach() if torch.distributed.is_initialized() else solo_context()
        self.lock = _lock_agreed(self.run_dir, self.ctx)
        self.events = MetricsLog(self.run_dir / layout.METRICS if self.ctx.is_main else None)
        self.manager = SnapshotManager(storage or location.storage(), self.cfg, self.ctx,
                                       on_outcome=self._record_save)
        self.policies: list[SavePolicy] = policies_from(self.cfg)
        self.preemption = PreemptionFlag().install()
        self.metrics: dict[str, float] = {}
        self._last_step_time: float | None = None
        self._intervals: dict[int, int | None] = {}
        """The interval in force (steps) when each save in flight started, for its `snapshot` event."""

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    # -- resume ------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any], check_hparams: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Load the newest committed snapshot that verifies into `state`; its step, or 0 if there is none.

        `check_hparams`, if given, is called with the `hparams` the snapshot was saved with before
        `state` is loaded: raise from it to refuse a resume whose settings changed.
        """
        self.manager.prepare_run_dir()
        restored = self.manager.restore_latest(into=lambda: _live_state_dicts(state))
        if restored is None:
            logger.info("no snapshot in %s: starting at step 0 at world size %d", self.manager.storage.describe(),
                        self.world_size)
            self.events.record({"event": "start", "step": 0, "world_size": self.world_size})
            return 0
        m = restored.manifest
        if check_hparams is not None:
            check_hparams(dict(m.config))
        _load(state, restored.objects, m.step)
        if restored.per_rank is not None:
            RNGState().load_state_dict(restored.per_rank[RNG_KEY])
        else:  # a new world size: saved streams have no owner; derive fresh ones reproducibly
            seed_all(self.seed, m.step, self.rank)
        self.metrics = dict(m.metrics)
        self.policies = policies_from(self.cfg, start_step=m.step)
        _tell_samplers(state, m.step)
        how = "" if m.world_size == self.world_size else f", resharded from world size {m.world_size}"
        logger.info("resumed from snapshot step %d (saved at world size %d) at world size %d%s",
                    m.step, m.world_size, self.world_size, how)
        self.events.record({"event": "resume", "step": m.step, "saved_world_size": m.world_size,
                            "world_size": self.world_size})
        return m.step

    # -- during training ---------------------------------------------------------------------

    def step(self, step: int, state: dict[str, Any], metrics: Metrics = None) -> None:
        """After training step `step`: save when a policy finds one due on any rank; on a preemption
        signal save this step, wait for its commit and raise `Preempted`. One small all-reduce."""
        now = time.monotonic()
        self._observe(now)
        _tell_samplers(state, step)
        progress = Progress(step, _epoch_ended(state), now)
        preempted, *due = self.ctx.any(self.preemption.is_requested, *(p.is_due(progress) for p in self.policies))
        if preempted:
            self._preempt(progress, state, metrics)
        reasons = [p.reason for p, d in zip(self.policies, due, strict=True) if d]
        if reasons:
            self._save(progress, state, metrics, reasons[0])
        self._last_step_time = now  # the next iteration measured includes this one's save and evaluation

    def close(self, step: int, state: dict[str, Any], metrics: Metrics = None) -> SaveResult | None:
        """Save `step` if no save of it was started, wait for every commit, release the run dir."""
        try:
            if self.manager.last_started_step != step:
                self._save(Progress(step, now=time.monotonic()), state, metrics, "end of run")
            return self.manager.wait()
        finally:
            self.preemption.uninstall()
            self.lock.release()

    # -- internals ---------------------------------------------------------------------------

    def _observe(self, now: float) -> None:
        auto = self._auto()
        if auto is None:
            return
        result = self.manager.pending.peek() if self.manager.pending is not None else None
        if result is not None:
            auto.write_seconds = result.commit_seconds
        if self._last_step_time is not None:  # the whole iteration, save and evaluation included
            auto.observe(now - self._last_step_time, saving=self.manager.is_saving())

    def _save(self, progress: Progress, state: dict[str, Any], metrics: Metrics, reason: str) -> None:
        if callable(metrics):
            metrics = metrics()
        if metrics is not None:
            self.metrics = {**dict(metrics), "metrics_step": progress.step}
        _tell_samplers(state, progress.step)
        meta = SnapshotMeta({"step": progress.step}, self.metrics, self.hparams, versions())
        if self.ctx.is_main:  # only rank 0 records the save's outcome, and so pops it again
            self._intervals[progress.step] = self._interval()
        started = time.perf_counter()
        pending = self.manager.save(progress.step, _state_dicts(state), {RNG_KEY: RNGState().state_dict()},
                                    meta, reason)
        if pending is None:
            return
        for p in self.policies:
            p.saved(progress)
        if (auto := self._auto()) is not None:
            auto.save_started(time.perf_counter() - started)

    def _preempt(self, progress: Progress, state: dict[str, Any], metrics: Metrics) -> None:
        received = self.ctx.exchange(f"preempted/{progress.step}", signal_name(self.preemption.signum))
        self._save(progress, state, metrics, "preemption")
        result = self.manager.wait()
        ranks = [r for r, name in enumerate(received) if name]
        self.events.record({"event": "preempted", "step": progress.step,
                            "signal": received[ranks[0]] if ranks else None, "signaled_ranks": ranks,
                            "snapshot": result.path if result else None, "world_size": self.world_size})
        self.preemption.uninstall()
        self.lock.release()
        raise Preempted(progress.step)

    def _interval(self) -> int | None:
        """The snapshot interval in steps now in force: `every_steps`, or what `"auto"` chose (None before it measured)."""
        if (auto := self._auto()) is not None:
            return auto.interval()
        return self.cfg.every_steps if isinstance(self.cfg.every_steps, int) and self.cfg.every_steps > 0 else None

    def _record_save(self, step: int, result: SaveResult | None, error: str | None, fatal: bool) -> None:
        """One `snapshot` event in metrics.jsonl per save that committed or failed (rank 0 records)."""
        row: dict[str, Any] = {"event": "snapshot", "step": step, "committed": result is not None,
                               "interval_steps": self._intervals.pop(step, None), "world_size": self.world_size}
        if result is not None:
            row.update(bytes=result.bytes, stall_s=round(result.stall_seconds, 4),
                       write_s=round(result.commit_seconds, 4), path=result.path)
        else:
            row.update(error=error, fatal=fatal)
        self.events.record(row)

    def _auto(self) -> YoungDaly | None:
        return next((p for p in self.policies if isinstance(p, YoungDaly)), None)


def _lock_agreed(run_dir: Path, ctx: DistContext) -> RunDirLock:
    """Rank 0 takes the run dir's lock; if another job holds it, every rank raises (exit 2)."""
    lock, refusal = RunDirLock(run_dir), ""
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except (RunDirLockedError, ConfigError) as e:
            refusal = str(e)
    refusal = ctx.exchange("run_dir_lock", refusal)[0] if ctx.world_size > 1 else refusal
    if refusal:
        raise RunDirLockedError(refusal)
    return lock


def _state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() if isinstance(obj, Stateful) else obj for name, obj in state.items()}


def _live_state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """What restore may read straight into: live tensors (a module's parameters and buffers, an
    optimizer's state, a plain tensor). Called once a snapshot is found, so an optimizer over
    sharded parameters may be given its state first."""
    live: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, torch.optim.Optimizer):
            make_sharded_state(obj)
        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            live[name] = obj.state_dict()
        elif isinstance(obj, torch.Tensor):
            live[name] = obj
    return live


def _load(state: dict[str, Any], saved: dict[str, Any], step: int) -> None:
    missing = sorted(set(state) - set(saved))
    if missing:
        raise ConfigError(f"the snapshot of step {step} holds no {missing} (it holds {sorted(saved)}); "
                          "pass the same state keys as the run that saved it, or use a new run dir")
    for name, obj in state.items():
        value = saved[name]
        if isinstance(obj, Stateful):
            obj.load_state_dict(value)
        elif isinstance(obj, torch.Tensor):
            with torch.no_grad():
                obj.copy_(value)
        elif isinstance(obj, dict):
            obj.clear()
            obj.update(value)
        elif isinstance(obj, list):
            obj[:] = value
        else:
            state[name] = value


def _tell_samplers(state: dict[str, Any], step: int) -> None:
    """Samplers record the batches consumed by `step`, not those a DataLoader prefetched."""
    for obj in state.values():
        if isinstance(obj, ResumableSampler):
            obj.consumed(step)


def _epoch_ended(state: dict[str, Any]) -> bool:
    """Whether the last step consumed an epoch's last batch (samplers told the step already)."""
    return any(obj.cursor.offset == 0 for obj in state.values() if isinstance(obj, ResumableSampler))
