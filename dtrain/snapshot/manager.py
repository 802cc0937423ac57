"""When to snapshot, what to restore, and what to keep.

The manager owns the decisions around the writer: the triggers (every N steps, every T seconds,
epoch end, preemption, the end of the run), the failure policy (warn and retry at the next
snapshot; stop after `max_consecutive_failures` in a row), resume (the newest committed snapshot
that verifies; a corrupt one is reported by name and the previous one used), and retention after
each commit (decided from the manifests on disk).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dtrain.config import AUTO, SnapshotConfig
from dtrain.dist import DistContext
from dtrain.errors import CorruptSnapshotError, SnapshotError
from dtrain.snapshot import layout, reader, retention
from dtrain.snapshot.interval import SaveCostMeter, young_daly_steps
from dtrain.snapshot.writer import PendingSnapshot, SaveResult, SnapshotWriter
from dtrain.storage import Storage

logger = logging.getLogger(__name__)

_AUTO_FIRST_STEP = 10  # under `every_steps = "auto"`, the first save measures what a save costs


class SnapshotManager:
    def __init__(self, storage: Storage, cfg: SnapshotConfig, ctx: DistContext) -> None:
        self.storage = storage
        self.cfg = cfg
        self.ctx = ctx
        self.writer = SnapshotWriter(storage, ctx, file_bytes=cfg.file_mb << 20,
                                     timeout_seconds=cfg.timeout_seconds, after_commit=self._after_commit,
                                     staging=cfg.staging, budget_bytes=cfg.memory_budget_mb << 20)
        self.consecutive_failures = 0
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self.cost = SaveCostMeter()
        self._write_seconds: float | None = None
        self._logged_cost: float | None = None
        self._pending: PendingSnapshot | None = None
        """The newest save started, kept to read its timings once it committed."""

    # -- start -------------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        """Create the layout and drop what crashed saves left (rank 0), then barrier: everything in
        `.pending/`, and in `snapshots/` the temp file of a `latest` update that a kill interrupted.
        No save of this run is in flight yet, so nothing removed here can be in use."""
        if self.ctx.is_main:
            self.storage.makedirs(layout.PENDING)
            for name in self.storage.listdir(layout.PENDING):
                logger.info("removing uncommitted leftover %s/%s", layout.PENDING, name)
                self.storage.remove_tree(f"{layout.PENDING}/{name}")
            for name in self.storage.remove_temp_files(layout.SNAPSHOTS):
                logger.info("removed the temp file of an interrupted update, %s/%s", layout.SNAPSHOTS, name)
        self.ctx.barrier()

    def restore_latest(self, into: dict[str, Any] | None = None) -> reader.Restored | None:
        """The newest committed snapshot that verifies, restored on every rank; None when there is none.

        `into` (live state dicts) receives the bytes directly, see `reader.restore`. When snapshots
        exist but none verifies, this raises rather than let the run start over: that would
        silently throw away the training they hold, and `into` may hold a mix of their bytes.
        """
        steps = self._agreed_steps()
        problems = []
        for step in reversed(steps):
            try:
                restored = reader.restore(self.storage, step, self.ctx, into)
            except CorruptSnapshotError as e:
                logger.warning("%s; falling back to the previous committed snapshot", e)
                problems.append(str(e))
                continue
            self.last_saved_step = step
            return restored
        if steps:
            raise CorruptSnapshotError(
                f"none of the {len(steps)} committed snapshots in {getattr(self.storage, 'root', 'the run dir')} "
                f"verifies ({'; '.join(problems)}); to start over, move the run dir's snapshots/ aside")
        return None

    def _agreed_steps(self) -> list[int]:
        """Rank 0's listing, so every rank tries the same snapshots in the same order."""
        steps = reader.committed_steps(self.storage) if self.ctx.is_main else []
        listed = self.ctx.exchange("resume/steps", ",".join(map(str, steps)))[0]
        return [int(s) for s in listed.split(",") if s]

    # -- triggers ----------------------------------------------------------------------------

    def is_time_due(self) -> bool:
        """This rank's opinion that `every_seconds` elapsed; ranks combine it with `DistContext.any`."""
        every = self.cfg.every_seconds
        return every > 0 and time.monotonic() - self._last_save_time >= every

    def is_step_due(self, step: int) -> bool:
        """This rank's opinion that a save by count is due. Under `auto` it rests on timings this rank
        measured, so ranks may differ: combine it with `DistContext.any`, as the trainer does."""
        every = self.cfg.every_steps
        if every != AUTO:
            return every > 0 and step % every == 0
        self._take_write_time()
        interval = self.auto_interval()
        if interval is None and self.is_saving():
            return False  # the bootstrap save is still being measured: another would only queue behind it
        # Counted from the last save, or the snapshot resumed from: never from step 0.
        return step - (self.last_saved_step or 0) >= (interval or _AUTO_FIRST_STEP)

    def observe_iteration(self, seconds: float) -> None:
        """One iteration of the training loop (step, evaluation, save) took `seconds` on this rank."""
        self.cost.observe(seconds, in_flight=self.is_saving())

    def is_saving(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def auto_interval(self) -> int | None:
        """The `auto` interval in steps, from the measured save cost; None until one save was measured."""
        save, step = self.cost.save_seconds, self.cost.step_seconds
        if save is None or not step or self._write_seconds is None:
            return None
        interval = young_daly_steps(save, self._write_seconds, self.cfg.mtbf_seconds, step)
        if save != self._logged_cost and self.ctx.is_main:  # once per measured save, not per step
            logger.info("every_steps=auto: %d steps (a save costs training %.3fs and writes for %.3fs; "
                        "steps of %.4fs; mtbf_seconds=%g)", interval, save, self._write_seconds, step,
                        self.cfg.mtbf_seconds)
        self._logged_cost = save
        return interval

    def _take_write_time(self) -> None:
        """The write time of a save that committed in the background, read without waiting for it."""
        result = self._pending.peek() if self._pending is not None else None
        if result is not None:
            self._write_seconds = result.commit_seconds

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, replicated: dict[str, Any], private: dict[str, Any], meta: dict[str, Any],
             reason: str) -> PendingSnapshot | None:
        """Start a save of `step` (once per step). A failed earlier save is counted here."""
        if step == self.last_saved_step:
            return None
        self._settle_previous()
        logger.info("snapshot of step %d (%s) staging", step, reason)
        started = time.perf_counter()
        pending = self.writer.save(step, replicated, private, meta)
        self.cost.save_started(stall_seconds=time.perf_counter() - started)
        self._pending = pending
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        return pending

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight; raises if it failed (its failure is counted)."""
        return self._settle_previous(strict=True)

    def _settle_previous(self, strict: bool = False) -> SaveResult | None:
        try:
            result = self.writer.wait()
        except SnapshotError as e:
            self.consecutive_failures += 1
            limit = self.cfg.max_consecutive_failures
            if strict or self.consecutive_failures >= limit:
                raise SnapshotError(f"{e} ({self.consecutive_failures} failed save(s) in a row, "
                                    f"snapshot.max_consecutive_failures={limit})") from e
            logger.warning("SNAPSHOT FAILED: %s; training continues and retries at the next snapshot "
                           "(%d of snapshot.max_consecutive_failures=%d)", e, self.consecutive_failures, limit)
            return None
        if result is not None:
            self.consecutive_failures = 0
            self._write_seconds = result.commit_seconds
        return result

    # -- after commit (rank 0, background thread) ----------------------------------------------

    def _after_commit(self, result: SaveResult) -> None:
        logger.info("snapshot step %d committed: %.1f MB, stall %.3fs, commit %.3fs after staging -> %s",
                    result.step, result.bytes / 1e6, result.stall_seconds, result.commit_seconds, result.path)
        try:
            self.prune(protected=frozenset({result.step}))
        except Exception as e:  # retention must never fail a save that is already committed
            logger.warning("retention after step %d failed and will be retried next time: %s", result.step, e)

    def prune(self, protected: frozenset[int] = frozenset()) -> list[int]:
        """Delete the committed snapshots the retention policy does not keep; returns their steps."""
        infos = []
        for step in reader.committed_steps(self.storage):
            try:
                metric = reader.read_manifest(self.storage, step).metrics.get(self.cfg.best_metric)
            except CorruptSnapshotError:
                metric = None
            infos.append(retention.SnapshotInfo(step, metric))
        doomed = retention.to_delete(infos, self.policy(), protected)
        for step in doomed:
            delete_snapshot(self.storage, step, self.ctx.nonce)
        return doomed

    def policy(self) -> retention.RetentionPolicy:
        c = self.cfg
        return retention.RetentionPolicy(c.keep_last, c.keep_best, c.best_mode, c.keep_every)


def delete_snapshot(storage: Storage, step: int, nonce: str) -> None:
    """Make the snapshot invisible with one atomic rename, then delete its files at leisure."""
    graveyard = f"{layout.PENDING}/deleting-{layout.step_dir_name(step)}.{nonce}"
    storage.makedirs(layout.PENDING)
    storage.rename(layout.committed_path(step), graveyard)
    storage.sync_dir(layout.SNAPSHOTS)
    storage.remove_tree(graveyard)
    logger.info("retention deleted %s", layout.step_dir_name(step))
