"""When to snapshot, what to restore, and what to keep.

The manager owns the decisions around the writer: the triggers (every N steps, every T seconds,
epoch end, preemption, the end of the run), the failure policy (warn and retry at the next
snapshot; stop after `max_consecutive_failures` in a row), resume (the newest committed snapshot
that verifies; a corrupt one is reported by name and the previous one used), and retention after
each commit (decided from the manifests on disk).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from dtrain.config import AUTO, SnapshotConfig
from dtrain.dist import DistContext
from dtrain.errors import CorruptSnapshotError, SnapshotError
from dtrain.snapshot import layout, reader, retention
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
        self._save_cost: float | None = None
        self._write_seconds = 0.0
        self._step_seconds: float | None = None
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
        self._measure_finished()
        interval = self.auto_interval()
        if interval is None and self._pending is not None and not self._pending.done():
            return False  # the bootstrap save is still being measured: another would only queue behind it
        # Counted from the last save, or the snapshot resumed from: never from step 0.
        return step - (self.last_saved_step or 0) >= (interval or _AUTO_FIRST_STEP)

    def observe_step_time(self, seconds: float) -> None:
        self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds

    def auto_interval(self) -> int | None:
        """The `auto` interval in steps, from the last measured save; None before one was measured."""
        if self._save_cost is None or not self._step_seconds:
            return None
        return young_daly_steps(self._save_cost, self._write_seconds, self.cfg.mtbf_seconds, self._step_seconds)

    def _measure_finished(self) -> None:
        """Take the timings of a save that committed in the background, without waiting for it."""
        result = self._pending.peek() if self._pending is not None else None
        if result is not None:
            self._measure(result)

    def _measure(self, result: SaveResult) -> None:
        self._save_cost = result.stall_seconds
        self._write_seconds = result.commit_seconds

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, replicated: dict[str, Any], private: dict[str, Any], meta: dict[str, Any],
             reason: str) -> PendingSnapshot | None:
        """Start a save of `step` (once per step). A failed earlier save is counted here."""
        if step == self.last_saved_step:
            return None
        self._settle_previous()
        logger.info("snapshot of step %d (%s) staging", step, reason)
        pending = self.writer.save(step, replicated, private, meta)
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
            self._measure(result)
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


def young_daly_steps(stall_seconds: float, write_seconds: float, mtbf_seconds: float, step_seconds: float) -> int:
    """Young/Daly's interval, sqrt(2 * C * MTBF), in steps of `step_seconds` (at least 1).

    C is what one save costs training: with asynchronous saves, the stall (staging), since the write
    runs beside training; an interval that minimizes the stall plus the expected lost work is the
    right trade. But a save cannot start before the previous one finished writing (it would wait for
    it, and that wait is a stall C left out), so the interval is never shorter than a write.

        young_daly_steps(0.5, 2.0, 3600, 0.25) == 240    # sqrt(2 * 0.5 * 3600) = 60 s of 0.25 s steps
        young_daly_steps(0.001, 9.0, 3600, 0.25) == 36   # the 9 s write bounds it, not the 2.7 s optimum
    """
    seconds = max(math.sqrt(2 * stall_seconds * mtbf_seconds), write_seconds)
    return max(1, math.ceil(seconds / step_seconds))


def delete_snapshot(storage: Storage, step: int, nonce: str) -> None:
    """Make the snapshot invisible with one atomic rename, then delete its files at leisure."""
    graveyard = f"{layout.PENDING}/deleting-{layout.step_dir_name(step)}.{nonce}"
    storage.makedirs(layout.PENDING)
    storage.rename(layout.committed_path(step), graveyard)
    storage.sync_dir(layout.SNAPSHOTS)
    storage.remove_tree(graveyard)
    logger.info("retention deleted %s", layout.step_dir_name(step))
