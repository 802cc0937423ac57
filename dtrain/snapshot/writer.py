"""Asynchronous, sharded snapshots and the protocol that commits them.

A save has five phases. Only the first blocks training.

1. Stage (training thread, every rank). The state dicts are split into JSON skeletons and
   tensors (`tree`); the replicated tensors are planned into files spread over the ranks
   (`plan`); each rank copies the bytes of *its* files, plus its private state, into host
   buffers. Training may change the parameters as soon as this returns.
2. Write (background thread, every rank). Each file goes into
   `snapshots/.pending/step_N.<nonce>/`, its CRC-32C computed on the way, and is fsynced.
3. Report. Each rank puts a small JSON report under a store key: its files' sizes and CRCs
   and its private skeletons, or its error. The store, not a collective, is the barrier: a
   background thread must never issue collectives on the training group.
4. Commit (rank 0). Rank 0 waits for every report, bounded by `snapshot.timeout_seconds`.
   If one is missing or carries an error the pending dir is removed and nothing is committed.
   Otherwise it writes `manifest.json` into the pending dir (fsynced), fsyncs that dir, renames
   it to `snapshots/step_N` (**the commit point**), fsyncs `snapshots/`, then atomically
   replaces `snapshots/latest`.
5. Publish. Rank 0 puts the outcome under a store key; every rank's `wait()` returns it, or
   raises it as a `SnapshotError`.

A crash at any instant leaves the last committed snapshot intact: before the rename, the new one
lives only under `.pending/` (never read, removed on the next start); after it, the new one is
complete and durable. `latest` is a convenience updated after the commit; resume scans for the
newest `step_N` holding a manifest, and verifies it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch

from dtrain.config import AUTO
from dtrain.dist import DistContext
from dtrain.errors import SnapshotError
from dtrain.snapshot import checksum, layout
from dtrain.snapshot.manifest import FileEntry, Manifest, Piece, TensorEntry, dtype_name
from dtrain.snapshot.plan import PlannedFile, plan_replicated, plan_single_file
from dtrain.snapshot.staging import ForkedWriter, byte_view, can_fork, release
from dtrain.snapshot.tree import as_bytes, flatten
from dtrain.storage import Storage

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SaveResult:
    step: int
    path: str
    bytes: int
    stall_seconds: float
    commit_seconds: float


@dataclass
class StagedSnapshot:
    """What one rank holds between staging and writing."""

    step: int
    pending: str
    files: list[tuple[PlannedFile, list[memoryview]]]
    private: dict[str, Any]
    private_tensors: dict[str, TensorEntry]
    nbytes: int = 0
    unowned: list[memoryview] | None = None
    """Fork staging: views of the pieces other ranks write, which the child gives up at once."""
    meta: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    replicated_tensors: dict[str, TensorEntry] = field(default_factory=dict)
    stall_seconds: float = 0.0


class PendingSnapshot:
    """A save in flight. `wait()` returns its `SaveResult` or raises the error it met."""

    def __init__(self, step: int, work: Callable[[], SaveResult]) -> None:
        self.step = step
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"dtrain-save-{step}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], SaveResult]) -> None:
        try:
            self._result = work()
        except BaseException as e:  # kept for wait(): a background error must reach the training thread
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def peek(self) -> SaveResult | None:
        """The result if the save already committed; None while it runs, or if it failed (`wait()` raises)."""
        return self._result if self.done() else None

    def wait(self) -> SaveResult:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class SnapshotWriter:
    """Stages, writes and commits snapshots of one run dir; at most one in flight.

    Example::

        writer = SnapshotWriter(LocalStorage(run_dir), ctx)
        pending = writer.save(step, {"model": model.state_dict()}, {"rng": rng.state_dict()}, meta)
        ...                     # training goes on
        result = pending.wait()  # committed, or raises SnapshotError
    """

    def __init__(self, storage: Storage, ctx: DistContext, file_bytes: int = 64 << 20,
                 timeout_seconds: float = 600.0,
                 after_commit: Callable[[SaveResult], None] | None = None,
                 staging: str = AUTO, budget_bytes: int = 0) -> None:
        self.storage = storage
        self.staging = staging
        self.budget_bytes = budget_bytes
        self.ctx = ctx
        self.file_bytes = file_bytes
        self.timeout = timeout_seconds
        self.after_commit = after_commit
        self._in_flight: PendingSnapshot | None = None
        self._old_outcome_key: str | None = None

    def save(self, step: int, replicated: dict[str, Any], private: dict[str, Any],
             meta: dict[str, Any]) -> PendingSnapshot:
        """Stage now, write and commit in the background. Waits for a save still in flight first."""
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            previous.wait()
        start = time.perf_counter()
        staged = self.stage(step, replicated, private, meta)
        if staged.unowned is not None:  # fork staging: a child process writes the shared image
            child = ForkedWriter(lambda wrote: self._write_in_child(staged, wrote), staged.nbytes, self.budget_bytes)
            staged.files, staged.unowned = [], None
            write = child.report
        else:
            write = lambda: self._write_files(staged)  # noqa: E731
        staged.stall_seconds = time.perf_counter() - start
        self._in_flight = PendingSnapshot(step, lambda: self._finish(staged, write))
        return self._in_flight

    def stage(self, step: int, replicated: dict[str, Any], private: dict[str, Any],
              meta: dict[str, Any]) -> StagedSnapshot:
        """Plan the files and hold this rank's bytes: copied, or (fork staging) as views of the live tensors."""
        rank, world = self.ctx.rank, self.ctx.world_size
        objects, tensors = {}, {}
        for name, state in replicated.items():
            objects[name], found = flatten(state, name)
            tensors.update(found)
        plan = plan_replicated({k: _nbytes(t) for k, t in tensors.items()}, world, self.file_bytes)
        by_reference = self.staging == "fork" or (self.staging == AUTO and can_fork(tensors))
        if by_reference:
            tensors = {k: t.contiguous() for k, t in tensors.items()}
        hold = _piece_views if by_reference else _copy_file
        files = [(f, hold(f, tensors)) for f in plan if f.writer == rank]
        private_skeletons, private_found = flatten(private, f"rank{rank:05d}")
        private_file = plan_single_file(layout.rank_file(rank), {k: _nbytes(t) for k, t in private_found.items()}, rank)
        files.append((private_file, _copy_file(private_file, private_found)))
        staged = StagedSnapshot(
            step=step, pending=layout.pending_path(step, self.ctx.nonce), files=files,
            private=private_skeletons, private_tensors=_entries([private_file], private_found),
            nbytes=sum(p.nbytes for f, _ in files for p in f.pieces),
            unowned=[v for f in plan if f.writer != rank for v in _piece_views(f, tensors)] if by_reference else None,
        )
        if rank == 0:
            staged.meta = json.loads(json.dumps(meta))  # frozen now: later changes must not leak in
            staged.objects = json.loads(json.dumps(objects))
            staged.replicated_tensors = _entries(plan, tensors)
        return staged

    def _write_in_child(self, staged: StagedSnapshot, wrote: Callable[[int], None]) -> dict[str, Any]:
        for view in staged.unowned:
            release(view)

        def done(view: memoryview) -> None:
            release(view)
            wrote(len(view))

        return self._write_files(staged, done)

    def _finish(self, staged: StagedSnapshot, write: Callable[[], dict[str, Any]]) -> SaveResult:
        """Background thread: write (or wait for the child that writes), report, commit or learn the outcome."""
        started = time.perf_counter()
        try:
            report = write()
        except SnapshotError as e:
            report = {"files": {}, "error": f"rank {self.ctx.rank}: {e}", "private": {}, "private_tensors": {}}
        staged.files = []  # release the staging buffers before waiting on other ranks
        if report["error"]:
            logger.warning("could not write the shard of step %d: %s", staged.step, report["error"])
        outcome_key = f"save/{staged.step}/outcome"
        self.ctx.store.set(f"save/{staged.step}/report/{self.ctx.rank}", json.dumps(report))
        if self.ctx.rank == 0:
            outcome = self._commit(staged)
            self.ctx.store.set(outcome_key, json.dumps(outcome))
        else:
            outcome = self._await_outcome(outcome_key)
        if outcome.get("error"):
            raise SnapshotError(outcome["error"])
        result = SaveResult(staged.step, outcome["path"], outcome["bytes"], staged.stall_seconds,
                            time.perf_counter() - started)
        if self.ctx.rank == 0:
            self._committed(result, outcome_key)
        return result

    def _write_files(self, staged: StagedSnapshot, done: Callable[[memoryview], None] | None = None) -> dict[str, Any]:
        report: dict[str, Any] = {"files": {}, "error": None, "private": staged.private,
                                  "private_tensors": {k: asdict(e) for k, e in staged.private_tensors.items()}}
        try:
            self.storage.makedirs(staged.pending)
            for planned, chunks in staged.files:
                report["files"][planned.name] = self._write_file(f"{staged.pending}/{planned.name}", chunks, done)
        except Exception as e:  # no logging here: this may run in a forked child
            report["error"] = f"rank {self.ctx.rank}: {type(e).__name__}: {e}"
        return report

    def _write_file(self, path: str, chunks: list[memoryview],
                    done: Callable[[memoryview], None] | None) -> dict[str, int]:
        crc, size = 0, 0
        handle = self.storage.open_write(path)
        try:
            for chunk in chunks:
                for start in range(0, len(chunk), checksum.BLOCK):  # checksum each block while it is in cache
                    block = chunk[start:start + checksum.BLOCK]
                    crc = checksum.extend(crc, block)
                    handle.write(block)
                size += len(chunk)
                if done is not None:
                    done(chunk)
            handle.close()
        except BaseException:
            handle.abort()
            raise
        return {"bytes": size, "crc32c": crc, "writer": self.ctx.rank}

    def _commit(self, staged: StagedSnapshot) -> dict[str, Any]:
        try:
            reports = self._gather_reports(staged.step)
            errors = [r["error"] for r in reports if r["error"]]
            if errors:
                raise SnapshotError("; ".join(errors))
            manifest = self._manifest(staged, reports)
            self.storage.write_atomic(f"{staged.pending}/{layout.MANIFEST}", manifest.to_json().encode())
            final = layout.committed_path(staged.step)
            if self.storage.exists(final):  # a snapshot of this step that failed verification earlier
                self.storage.rename(final, f"{layout.PENDING}/replaced-{layout.step_dir_name(staged.step)}.{self.ctx.nonce}")
            self.storage.rename(staged.pending, final)
            self.storage.sync_dir(layout.SNAPSHOTS)
            self.storage.write_atomic(layout.LATEST, f"{layout.step_dir_name(staged.step)}\n".encode())
            return {"error": None, "path": final, "bytes": manifest.total_bytes}
        except Exception as e:
            self.storage.remove_tree(staged.pending)
            return {"error": f"snapshot of step {staged.step} was not committed: {e}"}

    def _gather_reports(self, step: int) -> list[dict[str, Any]]:
        keys = [f"save/{step}/report/{r}" for r in range(self.ctx.world_size)]
        try:
            self.ctx.store.wait(keys, _seconds(self.timeout))
        except Exception:
            missing = [r for r, k in enumerate(keys) if not self.ctx.store.check([k])]
            raise SnapshotError(f"rank(s) {missing} did not report their shards within "
                                f"snapshot.timeout_seconds={self.timeout:g}") from None
        reports = [json.loads(self.ctx.store.get(k)) for k in keys]
        for k in keys:
            self.ctx.store.delete_key(k)
        return reports

    def _manifest(self, staged: StagedSnapshot, reports: list[dict[str, Any]]) -> Manifest:
        tensors = dict(staged.replicated_tensors)
        files: dict[str, FileEntry] = {}
        for r in reports:
            files.update({name: FileEntry(**f) for name, f in r["files"].items()})
            tensors.update({k: _entry_from_json(e) for k, e in r["private_tensors"].items()})
        return Manifest(
            step=staged.step, world_size=self.ctx.world_size, created_unix=time.time(),
            progress=staged.meta.get("progress", {}), metrics=staged.meta.get("metrics", {}),
            config=staged.meta.get("config", {}), versions=staged.meta.get("versions", {}),
            objects=staged.objects, per_rank=[r["private"] for r in reports], tensors=tensors, files=files,
        )

    def _await_outcome(self, key: str) -> dict[str, Any]:
        try:
            self.ctx.store.wait([key], _seconds(self.timeout + 60))
        except Exception:
            return {"error": f"rank 0 did not publish the outcome of this save within {self.timeout + 60:g}s"}
        return json.loads(self.ctx.store.get(key))

    def _committed(self, result: SaveResult, outcome_key: str) -> None:
        if self._old_outcome_key is not None:  # every rank has read it: each waited for it before this save
            self.ctx.store.delete_key(self._old_outcome_key)
        self._old_outcome_key = outcome_key
        if self.after_commit is not None:
            self.after_commit(result)

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight, if any."""
        pending, self._in_flight = self._in_flight, None
        return pending.wait() if pending is not None else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _copy_file(planned: PlannedFile, tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The bytes of one planned file, copied off the live tensors (or the device) into one host buffer."""
    buf = torch.empty(planned.nbytes, dtype=torch.uint8)
    views: dict[str, torch.Tensor] = {}
    for p in planned.pieces:
        src = views.setdefault(p.key, as_bytes(tensors[p.key]))
        buf[p.file_offset:p.file_offset + p.nbytes].copy_(src[p.tensor_offset:p.tensor_offset + p.nbytes])
    return [memoryview(buf.numpy())]


def _piece_views(planned: PlannedFile, tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The bytes of one planned file as views of the live (contiguous, host) tensors: no copy."""
    views: dict[str, memoryview] = {}
    return [views.setdefault(p.key, byte_view(tensors[p.key]))[p.tensor_offset:p.tensor_offset + p.nbytes]
            for p in planned.pieces]


def _entries(plan: list[PlannedFile], tensors: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    entries = {k: TensorEntry(dtype_name(t.dtype), list(t.shape), []) for k, t in tensors.items()}
    for planned in plan:
        for p in planned.pieces:
            entries[p.key].pieces.append(Piece(planned.name, p.file_offset, p.tensor_offset, p.nbytes))
    return entries


def _entry_from_json(d: dict[str, Any]) -> TensorEntry:
    return TensorEntry(d["dtype"], d["shape"], [Piece(**p) for p in d["pieces"]])


def _seconds(s: float) -> timedelta:
    return timedelta(seconds=s)
