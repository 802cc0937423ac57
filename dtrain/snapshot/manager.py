"""The snapshots of one run dir during training: start-up cleanup, resume, saving with its failure
policy, and retention after each commit.

Resume takes the newest committed snapshot that verifies; a corrupt one is reported by name and
the previous one used. A failed save warns and is retried at the next one; after
`max_consecutive_failures` in a row training stops. Retention runs after each commit, from the
manifests on disk (`catalog.prune`). *When* to save is not decided here: see `policy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dtrain.config import SnapshotConfig
from dtrain.dist import DistContext
from dtrain.errors import CorruptSnapshotError, SnapshotError
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.writer import PendingSnapshot, SaveResult, SnapshotWriter
from dtrain.storage import Storage

logger = logging.getLogger(__name__)


SaveRecorder = Callable[[int, SaveResult | None, str | None, bool], None]
"""Called with (step, result, error, fatal) once each save committed or failed: the run's event log."""


class SnapshotManager:
    def __init__(self, storage: Storage, cfg: SnapshotConfig, ctx: DistContext,
                 on_outcome: SaveRecorder | None = None) -> None:
        self.storage = storage
        self.on_outcome = on_outcome
        self.cfg = cfg
        self.ctx = ctx
        self.writer = SnapshotWriter(storage, ctx, file_bytes=cfg.file_mb << 20,
                                     timeout_seconds=cfg.timeout_seconds, after_commit=self._after_commit,
                                     staging=cfg.staging, budget_bytes=cfg.memory_budget_mb << 20)
        self.consecutive_failures = 0
        self.last_started_step: int | None = None
        """The step of the newest save started (committed or not yet), or the snapshot resumed from."""
        self.pending: PendingSnapshot | None = None
        """The newest save started, kept to read its timings once it committed."""

    # -- start -------------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        """Create the layout and drop what crashed saves left (rank 0), then barrier: everything in
        `.pending/`, every `step_N` without a manifest (a save that wrote its files in place but
        never committed), and what interrupted writes left (the temp file of a `latest` update,
        unfinished multipart uploads). No save of this run is in flight yet, so nothing removed
        here can be in use."""
        if self.ctx.is_main:
            self.storage.makedirs(layout.PENDING)
            for name in self.storage.listdir(layout.PENDING):
                logger.info("removing uncommitted leftover %s/%s", layout.PENDING, name)
                self.storage.remove_tree(f"{layout.PENDING}/{name}")
            for name in catalog.uncommitted_step_dirs(self.storage):
                logger.info("removing uncommitted leftover %s/%s (no manifest)", layout.SNAPSHOTS, name)
                self.storage.remove_tree(f"{layout.SNAPSHOTS}/{name}")
            for name in self.storage.remove_temp_files(layout.SNAPSHOTS):
                logger.info("removed what an interrupted write left, %s/%s", layout.SNAPSHOTS, name)
        self.ctx.barrier()

    def restore_latest(self, into: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> reader.Restored | None:
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
                self.writer.replaceable.add(step)  # training reaches this step again and replaces it
                continue
            self.last_started_step = step
            return restored
        if steps:
            raise CorruptSnapshotError(
                f"none of the {len(steps)} committed snapshots in {self.storage.describe()} "
                f"verifies ({'; '.join(problems)}); to start over, move the run dir's snapshots/ aside")
        return None

    def _agreed_steps(self) -> list[int]:
        """Rank 0's listing, so every rank tries the same snapshots in the same order."""
        steps = catalog.committed_steps(self.storage) if self.ctx.is_main else []
        listed = self.ctx.exchange("resume/steps", ",".join(map(str, steps)))[0]
        return [int(s) for s in listed.split(",") if s]

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, replicated: dict[str, Any], per_rank: dict[str, Any], meta: SnapshotMeta,
             reason: str) -> PendingSnapshot | None:
        """Start a save of `step` (once per step). A failed earlier save is counted here."""
        if step == self.last_started_step:
            return None
        self._settle_previous()
        logger.info("snapshot of step %d (%s) staging", step, reason)
        self.pending = self.writer.save(step, replicated, per_rank, meta)
        self.last_started_step = step
        return self.pending

    def is_saving(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight; raises if it failed (its failure is counted)."""
        return self._settle_previous(strict=True)

    def _settle_previous(self, strict: bool = False) -> SaveResult | None:
        try:
            result = self.writer.wait()
        except SnapshotError as e:
            self.consecutive_failures += 1
            limit = self.cfg.max_consecutive_failures
            self._record(self.pending.step if self.pending else -1, None, str(e),
                         strict or self.consecutive_failures >= limit)
            if strict or self.consecutive_failures >= limit:
                raise SnapshotError(f"{e} ({self.consecutive_failures} failed save(s) in a row, "
                                    f"snapshot.max_consecutive_failures={limit})") from e
            logger.warning("SNAPSHOT FAILED: %s; training continues and retries at the next snapshot "
                           "(%d of snapshot.max_consecutive_failures=%d)", e, self.consecutive_failures, limit)
            return None
        if result is not None:
            self.consecutive_failures = 0
        return result

    # -- after commit (rank 0, background thread) ----------------------------------------------

    def _after_commit(self, result: SaveResult) -> None:
        logger.info("snapshot step %d committed: %.1f MB, stall %.3fs, commit %.3fs after staging -> %s",
                    result.step, result.bytes / 1e6, result.stall_seconds, result.commit_seconds, result.path)
        self._record(result.step, result, None, False)
        try:
            catalog.prune(self.storage, self.cfg, protected=frozenset({result.step}), nonce=self.ctx.nonce)
        except Exception as e:  # retention must never fail a save that is already committed
            logger.warning("retention after step %d failed and will be retried next time: %s", result.step, e)

    def _record(self, step: int, result: SaveResult | None, error: str | None, fatal: bool) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(step, result, error, fatal)
        except Exception as e:  # a lost record must not fail a save
            logger.warning("could not record the outcome of the save of step %d: %s", step, e)
