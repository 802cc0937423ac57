"""Asynchronous, sharded snapshots and the protocol that commits them.

A save has five phases. Only the first blocks training.

1. Stage (training thread, every rank). The state dicts are split into JSON skeletons and
   tensors (`tree`); tensors that share bytes are stored once (`aliases`); the replicated tensors
   are planned into files spread over the ranks (`plan`), and each rank's rows of the sharded
   ones (FSDP's DTensors, `shards`) into files of its own; each rank copies the bytes of *its*
   files, plus its own per-rank state, into reused host buffers (or, with fork staging, a child
   process keeps a copy-on-write image of them). Training may change the parameters as soon as
   this returns.
2. Write (background thread, every rank). Each file goes into the save's dir, the CRC-32C of
   each of its pieces computed on the way (the file's is their combination), and is made durable.
   The storage says where (`Storage.save_dir`): `snapshots/.pending/step_N.<nonce>/` where it can
   rename directories, `snapshots/step_N/` itself on an object store, where the manifest alone commits.
3. Report. Each rank puts a `ShardReport` under a store key: its files' sizes and CRCs and its
   own skeletons, or its error. The store, not a collective, is the barrier: a background thread
   must never issue collectives on the training group, and it uses a store client of its own.
4. Commit (rank 0). Rank 0 waits for every report, until the save's deadline. If one is missing
   or carries an error the save's dir is removed and nothing is committed. Otherwise it hands the
   checksummed manifest to `Storage.commit`, which writes it last and makes the snapshot visible
   (**the commit point**): locally, `manifest.json` into the pending dir (fsynced), then a rename
   to `snapshots/step_N` and an fsync of `snapshots/`; on S3, a PUT of `manifest.json` that
   refuses to overwrite (`If-None-Match: *`). Then it replaces `snapshots/latest`, a hint. An
   error after the commit point only warns: the snapshot is committed.
5. Publish. Rank 0 puts the `Outcome` under a store key; every rank's `wait()` returns it, or
   raises it as a `SnapshotError`.

One deadline, `snapshot.timeout_seconds` from the start of the save, bounds every wait of it: this
rank's own write (a stuck disk, a writer process that never reports), rank 0's wait for the
reports, and the wait for the outcome (plus a grace for rank 0 to commit). Past it the save
fails like any other, and nothing of it is ever committed later.

A crash at any instant leaves the last committed snapshot intact: before the commit point, the
new one is files without a manifest (never read, removed on the next start); after it, the new
one is complete and durable. `latest` is a hint updated after the commit; resume lists the
`step_N` holding a manifest, and verifies the newest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from dtrain.config import AUTO
from dtrain.dist import DistContext
from dtrain.errors import SnapshotError
from dtrain.snapshot import checksum, layout
from dtrain.snapshot.aliases import split_shared
from dtrain.snapshot.manifest import FileEntry, Manifest, Piece, TensorEntry, View, contiguous_strides, dtype_name
from dtrain.snapshot.messages import Outcome, ShardReport, SnapshotMeta
from dtrain.snapshot.plan import PlannedFile, plan_replicated, plan_shards, plan_single_file
from dtrain.snapshot.shards import LocalRows, is_sharded, local_rows, same_rows
from dtrain.snapshot.staging import ForkedWriter, PageReleaser, StagingBuffers, byte_view, can_fork
from dtrain.snapshot.tree import as_bytes, flatten
from dtrain.storage import CommitConflictError, Storage

logger = logging.getLogger(__name__)

COMMIT_GRACE_SECONDS = 60.0
"""How long past the deadline the other ranks wait for rank 0 to write the manifest and rename."""


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
    save_dir: str
    """Where its files go: the pending dir, or the final one where the manifest alone commits."""
    deadline: float
    """`time.monotonic()` by which every wait of this save ends."""
    files: list[tuple[PlannedFile, list[memoryview]]]
    per_rank: dict[str, Any]
    per_rank_tensors: dict[str, TensorEntry]
    sharded_tensors: dict[str, TensorEntry] = field(default_factory=dict)
    """Every sharded tensor, with the pieces of this rank's rows (each rank reports its own)."""
    nbytes: int = 0
    unowned: list[memoryview] | None = None
    """Fork staging: views of the pieces other ranks write, which the child gives up at once."""
    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    objects: dict[str, Any] = field(default_factory=dict)
    replicated_tensors: dict[str, TensorEntry] = field(default_factory=dict)
    stall_seconds: float = 0.0
    store_prefix: str = ""
    """This save's keys in the store: `save/<n>-<step>`, `n` counting this writer's saves, so that a
    step saved again (a run dir replaced, a snapshot that failed verification) never meets the
    messages of the earlier save of that step."""


class PendingSnapshot:
    """A save in flight. `wait()` returns its `SaveResult` or raises the error it met."""

    def __init__(self, step: int, deadline: float, work: Callable[[], SaveResult]) -> None:
        self.step = step
        self.deadline = deadline
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
        """The result; raises what the save met, or SnapshotError once its deadline (and grace) passed."""
        self._thread.join(max(0.0, self.deadline + COMMIT_GRACE_SECONDS + 5 - time.monotonic()))
        if self._thread.is_alive():  # its thread stays blocked (a stuck disk); the save can no longer commit
            raise SnapshotError(f"the save of step {self.step} did not finish within snapshot.timeout_seconds "
                                "(a stuck disk or rank?); it was abandoned")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class SnapshotWriter:
    """Stages, writes and commits snapshots of one run dir; at most one in flight.

    Example::

        writer = SnapshotWriter(LocalStorage(run_dir), ctx)
        pending = writer.save(step, {"model": model.state_dict()}, {"rng": rng.state_dict()}, SnapshotMeta(progress))
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
        self._saves = 0
        self._buffers = StagingBuffers()
        self.replaceable: set[int] = set()
        """Steps whose committed snapshot failed verification at resume: a save of one replaces it.
        Any other committed snapshot of a step is never replaced (the commit refuses)."""

    def save(self, step: int, replicated: dict[str, Any], per_rank: dict[str, Any],
             meta: SnapshotMeta = SnapshotMeta()) -> PendingSnapshot:
        """Stage now, write and commit in the background. Waits for a save still in flight first."""
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            self._wait_previous(previous)
        start = time.perf_counter()
        staged = self.stage(step, replicated, per_rank, meta)
        self._saves += 1
        staged.store_prefix = f"save/{self._saves}-{step}"
        if staged.unowned is not None:  # fork staging: a child process writes the shared image
            child = ForkedWriter(lambda wrote: self._write_in_child(staged, wrote), staged.nbytes,
                                 self.budget_bytes, staged.deadline)
            staged.files, staged.unowned = [], None
            write = child.wait
        else:
            write = lambda: self._write_files(staged)  # noqa: E731
        staged.stall_seconds = time.perf_counter() - start
        self._in_flight = PendingSnapshot(step, staged.deadline, lambda: self._finish(staged, write))
        return self._in_flight

    def _wait_previous(self, previous: PendingSnapshot) -> SaveResult:
        try:
            return previous.wait()
        except SnapshotError:
            if not previous.done():  # its thread may still read the staging buffers: never reuse them
                self._buffers = StagingBuffers()
            raise

    def stage(self, step: int, replicated: dict[str, Any], per_rank: dict[str, Any],
              meta: SnapshotMeta = SnapshotMeta()) -> StagedSnapshot:
        """Plan the files and hold this rank's bytes: copied, or (fork staging) as views of the live tensors."""
        rank, world = self.ctx.rank, self.ctx.world_size
        objects, found = {}, {}
        for name, state in replicated.items():
            objects[name], tensors = flatten(state, name)
            found.update(tensors)
        rows = {k: local_rows(k, t) for k, t in found.items() if is_sharded(t)}
        tied = _tied(rows)
        shared = split_shared({k: t for k, t in found.items() if k not in rows})
        plan = plan_replicated({k: _nbytes(t) for k, t in shared.stored.items()}, world, self.file_bytes)
        own_rows = {k: r.local for k, r in rows.items() if k not in tied and r.writes}
        shard_plan = plan_shards({k: _nbytes(t) for k, t in own_rows.items()}, rank, self.file_bytes)
        by_reference = self.staging == "fork"
        tensors = {**shared.stored, **own_rows}
        if by_reference and not can_fork(tensors):
            raise SnapshotError("snapshot.staging = 'fork' needs Linux and host tensors (a forked child cannot "
                                "read GPU memory); use copy or auto")
        tensors = _fork_safe(tensors) if by_reference else tensors
        hold = _piece_views if by_reference else self._copy_file
        files = [(f, hold(f, tensors)) for f in plan if f.writer == rank]
        files += [(f, hold(f, tensors)) for f in shard_plan]
        per_rank_skeletons, per_rank_found = flatten(per_rank, layout.per_rank_prefix(rank))
        per_rank_shared = split_shared(per_rank_found)
        per_rank_file = plan_single_file(layout.per_rank_file(rank), {k: _nbytes(t) for k, t in per_rank_shared.stored.items()}, rank)
        files.append((per_rank_file, self._copy_file(per_rank_file, per_rank_shared.stored)))
        self._buffers.keep_only({f.name for f, _ in files})
        _synchronize_copies(tensors)
        staged = StagedSnapshot(
            step=step, save_dir=self.storage.save_dir(layout.pending_path(step, self.ctx.nonce), layout.committed_path(step)),
            deadline=time.monotonic() + self.timeout,
            files=files, per_rank=per_rank_skeletons, per_rank_tensors=_entries([per_rank_file], per_rank_shared.stored, per_rank_shared.views),
            sharded_tensors=_sharded_entries(shard_plan, rows, tied),
            nbytes=sum(p.nbytes for f, _ in files for p in f.pieces),
            unowned=[v for f in plan if f.writer != rank for v in _piece_views(f, tensors)] if by_reference else None,
        )
        if rank == 0:
            staged.meta = meta.frozen()
            staged.objects = json.loads(json.dumps(objects))
            staged.replicated_tensors = _entries(plan, shared.stored, shared.views)
        return staged

    def _copy_file(self, planned: PlannedFile, tensors: dict[str, torch.Tensor]) -> list[memoryview]:
        """The bytes of one planned file, copied off the live tensors (or the device) into its reused host buffer."""
        pin = any(tensors[p.key].device.type == "cuda" for p in planned.pieces)
        buf = self._buffers.get(planned.name, planned.nbytes, pin)
        views: dict[str, torch.Tensor] = {}
        for p in planned.pieces:
            src = views.setdefault(p.key, as_bytes(tensors[p.key]))
            buf[p.file_offset:p.file_offset + p.nbytes].copy_(src[p.tensor_offset:p.tensor_offset + p.nbytes],
                                                              non_blocking=pin)
        return [memoryview(buf.numpy())]

    def _write_in_child(self, staged: StagedSnapshot, wrote: Callable[[int], None]) -> dict[str, Any]:
        pages = PageReleaser([v for _, chunks in staged.files for v in chunks])
        for view in staged.unowned:
            pages.release(view)

        def done(view: memoryview) -> None:
            pages.written(view)
            wrote(len(view))

        return self._write_files(staged, done)

    def _finish(self, staged: StagedSnapshot, write: Callable[[], dict[str, Any]]) -> SaveResult:
        """Background thread: write (or wait for the child that writes), report, commit or learn the outcome."""
        started = time.perf_counter()
        try:
            written = write()
        except SnapshotError as e:
            written = {"error": f"rank {self.ctx.rank}: {e}"}
        staged.files = []  # release the staging buffers before waiting on other ranks
        # a writer process that failed outside its writes reports only its error
        report = ShardReport(self.ctx.rank, {k: FileEntry(**f) for k, f in written.get("files", {}).items()},
                             written["error"], staged.per_rank, staged.per_rank_tensors, staged.sharded_tensors,
                             written.get("pieces", {}))
        if report.error:
            logger.warning("could not write the shard of step %d: %s", staged.step, report.error)
        store = self.ctx.save_store
        outcome_key = f"{staged.store_prefix}/outcome"
        store.set(f"{staged.store_prefix}/report/{self.ctx.rank}", report.to_json())
        if self.ctx.rank == 0:
            outcome = self._commit(staged)
            store.set(outcome_key, outcome.to_json())
        else:
            outcome = self._await_outcome(outcome_key, staged.deadline + COMMIT_GRACE_SECONDS)
        if outcome.error:
            raise SnapshotError(outcome.error)
        result = SaveResult(staged.step, outcome.path, outcome.bytes, staged.stall_seconds,
                            time.perf_counter() - started)
        if self.ctx.rank == 0:
            self._committed(result, outcome_key)
        return result

    def _write_files(self, staged: StagedSnapshot, done: Callable[[memoryview], None] | None = None) -> dict[str, Any]:
        written: dict[str, Any] = {"files": {}, "pieces": {}, "error": None}
        try:
            self.storage.makedirs(staged.save_dir)
            for planned, chunks in staged.files:
                entry, crcs = self._write_file(f"{staged.save_dir}/{planned.name}", planned, chunks, done)
                written["files"][planned.name] = entry
                written["pieces"][planned.name] = [[p.file_offset, p.nbytes, c] for p, c in zip(planned.pieces, crcs, strict=True)]
        except Exception as e:  # no logging here: this may run in a forked child
            written["error"] = f"rank {self.ctx.rank}: {type(e).__name__}: {e}"
        return written

    def _write_file(self, path: str, planned: PlannedFile, chunks: list[memoryview],
                    done: Callable[[memoryview], None] | None) -> tuple[dict[str, int], list[int]]:
        """Write one file from `chunks`: its whole bytes in one buffer (copy staging, page-aligned, so
        the storage can write it around the page cache) or one chunk per piece (fork staging).
        Returns its entry and each piece's CRC-32C; the file's CRC is their combination."""
        whole = len(chunks) == 1 and len(planned.pieces) != 1
        pieces = [chunks[0][p.file_offset:p.file_offset + p.nbytes] for p in planned.pieces] if whole else chunks
        crcs = [checksum.extend(0, piece) for piece in pieces]
        crc = 0
        for piece, piece_crc in zip(pieces, crcs, strict=True):
            crc = checksum.combine(crc, piece_crc, len(piece))
        handle = self.storage.open_write(path)
        try:
            for chunk in chunks:
                for start in range(0, len(chunk), checksum.BLOCK):
                    handle.write(chunk[start:start + checksum.BLOCK])
                if done is not None:
                    done(chunk)
            handle.close()
        except BaseException:
            handle.abort()
            raise
        return {"bytes": sum(len(c) for c in chunks), "crc32c": crc, "writer": self.ctx.rank}, crcs

    def _commit(self, staged: StagedSnapshot) -> Outcome:
        final = layout.committed_path(staged.step)
        try:
            reports = self._gather_reports(staged.store_prefix, staged.deadline)
            errors = [r.error for r in reports if r.error]
            if errors:
                raise SnapshotError("; ".join(errors))
            manifest = self._manifest(staged, reports)
            if time.monotonic() > staged.deadline:  # the other ranks may have given this save up
                raise SnapshotError(f"its deadline passed (snapshot.timeout_seconds={self.timeout:g})")
            if staged.step in self.replaceable and self.storage.exists(f"{final}/{layout.MANIFEST}"):
                aside = f"{layout.PENDING}/replaced-{layout.step_dir_name(staged.step)}.{self.ctx.nonce}"
                self.storage.uncommit(final, aside, layout.MANIFEST)
            self.storage.commit(staged.save_dir, final, layout.MANIFEST, manifest.to_bytes())
        except CommitConflictError as e:  # another writer's snapshot: its files must stay
            if staged.save_dir != final:
                self.storage.remove_tree(staged.save_dir)
            return Outcome(None, error=f"snapshot of step {staged.step} was not committed: {e}")
        except Exception as e:
            self.storage.remove_tree(staged.save_dir)
            return Outcome(None, error=f"snapshot of step {staged.step} was not committed: {e}")
        self.replaceable.discard(staged.step)
        self._after_commit_point(staged.step)
        return Outcome(final, manifest.total_bytes)

    def _after_commit_point(self, step: int) -> None:
        """Past the commit point: the snapshot is committed whatever fails here, so failures only warn."""
        try:
            self.storage.write_atomic(layout.LATEST, f"{layout.step_dir_name(step)}\n".encode())
        except Exception as e:
            logger.warning("snapshot of step %d is committed, but updating %s failed (%s: %s); resume finds it "
                           "by listing snapshots/", step, layout.LATEST, type(e).__name__, e)

    def _gather_reports(self, prefix: str, deadline: float) -> list[ShardReport]:
        store = self.ctx.save_store
        keys = [f"{prefix}/report/{r}" for r in range(self.ctx.world_size)]
        try:
            store.wait(keys, _until(deadline))
        except Exception:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            raise SnapshotError(f"rank(s) {missing} did not report their shards within "
                                f"snapshot.timeout_seconds={self.timeout:g}") from None
        reports = [ShardReport.from_json(store.get(k)) for k in keys]
        for k in keys:
            store.delete_key(k)
        return reports

    def _manifest(self, staged: StagedSnapshot, reports: list[ShardReport]) -> Manifest:
        tensors = {**staged.replicated_tensors, **_merge_sharded([r.sharded_tensors for r in reports])}
        files: dict[str, FileEntry] = {}
        crcs: dict[tuple[str, int, int], int] = {}
        for r in reports:
            files.update(r.files)
            tensors.update(r.per_rank_tensors)
            crcs.update({(name, offset, n): c for name, pieces in r.piece_crcs.items() for offset, n, c in pieces})
        tensors = {k: _with_crcs(t, crcs) for k, t in tensors.items()}
        return Manifest(
            step=staged.step, world_size=self.ctx.world_size, created_unix=time.time(),
            progress=staged.meta.progress, metrics=staged.meta.metrics,
            config=staged.meta.config, versions=staged.meta.versions,
            objects=staged.objects, per_rank=[r.per_rank for r in reports], tensors=tensors, files=files,
        )

    def _await_outcome(self, key: str, deadline: float) -> Outcome:
        try:
            self.ctx.save_store.wait([key], _until(deadline))
        except Exception:
            return Outcome(None, error=f"rank 0 did not publish the outcome of this save within "
                                       f"snapshot.timeout_seconds={self.timeout:g} (+{COMMIT_GRACE_SECONDS:g}s)")
        return Outcome.from_json(self.ctx.save_store.get(key))

    def _committed(self, result: SaveResult, outcome_key: str) -> None:
        if self._old_outcome_key is not None:  # every rank has read it: each waited for it before this save
            self.ctx.save_store.delete_key(self._old_outcome_key)
        self._old_outcome_key = outcome_key
        if self.after_commit is not None:
            self.after_commit(result)

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight, if any."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return None
        return self._wait_previous(pending)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fork_safe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous host tensors a forked child can read as they are now. Copy-on-write does not
    protect shared memory (`share_memory_()`, a DataLoader's tensors): the child would see later
    bytes, so those are copied here, as are non-contiguous tensors."""
    return {k: t.clone(memory_format=torch.contiguous_format) if t.is_shared() else t.contiguous()
            for k, t in tensors.items()}


def _synchronize_copies(tensors: dict[str, torch.Tensor]) -> None:
    """Device-to-host copies into pinned buffers are asynchronous: finish them before training goes on."""
    if any(t.device.type == "cuda" for t in tensors.values()):
        torch.cuda.synchronize()


def _piece_views(planned: PlannedFile, tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The bytes of one planned file as views of the live (contiguous, host) tensors: no copy."""
    views: dict[str, memoryview] = {}
    return [views.setdefault(p.key, byte_view(tensors[p.key]))[p.tensor_offset:p.tensor_offset + p.nbytes]
            for p in planned.pieces]


def _entries(plan: list[PlannedFile], stored: dict[str, torch.Tensor],
             views: dict[str, tuple[torch.Tensor, View]]) -> dict[str, TensorEntry]:
    entries = {k: TensorEntry(dtype_name(t.dtype), list(t.shape), []) for k, t in stored.items()}
    for planned in plan:
        for p in planned.pieces:
            entries[p.key].pieces.append(Piece(planned.name, p.file_offset, p.tensor_offset, p.nbytes))
    entries.update({k: TensorEntry(dtype_name(t.dtype), list(t.shape), [], view) for k, (t, view) in views.items()})
    return entries


def _tied(rows: dict[str, LocalRows]) -> dict[str, str]:
    """Sharded keys that are another key's tensor (a tied parameter), each to the key stored for it."""
    stored: list[str] = []
    tied = {}
    for key, r in rows.items():
        base = next((k for k in stored if same_rows(rows[k], r)), None)
        if base is None:
            stored.append(key)
        else:
            tied[key] = base
    return tied


def _sharded_entries(plan: list[PlannedFile], rows: dict[str, LocalRows], tied: dict[str, str]) -> dict[str, TensorEntry]:
    """Every sharded tensor's entry: its whole shape, and the pieces of the rows this rank writes,
    at their offsets in the whole tensor; a tied key is an alias of the key stored for it."""
    entries = {k: TensorEntry(dtype_name(r.local.dtype), r.shape, []) for k, r in rows.items() if k not in tied}
    for planned in plan:
        for p in planned.pieces:
            at = rows[p.key].byte_offset + p.tensor_offset
            entries[p.key].pieces.append(Piece(planned.name, p.file_offset, at, p.nbytes))
    for key, base in tied.items():
        r = rows[key]
        entries[key] = TensorEntry(dtype_name(r.local.dtype), r.shape, [], View(base, 0, contiguous_strides(r.shape)))
    return entries


def _merge_sharded(reported: list[dict[str, TensorEntry]]) -> dict[str, TensorEntry]:
    """The sharded tensors' entries with every rank's pieces, in the order of the bytes they hold."""
    merged = {}
    for key, entry in reported[0].items():
        pieces = [p for entries in reported for p in entries.get(key, TensorEntry("", [], [])).pieces]
        merged[key] = TensorEntry(entry.dtype, entry.shape, sorted(pieces, key=lambda p: (p.tensor_offset, p.nbytes)),
                                  entry.view)
    return merged


def _with_crcs(entry: TensorEntry, crcs: dict[tuple[str, int, int], int]) -> TensorEntry:
    pieces = [dataclasses.replace(p, crc32c=crcs[(p.file, p.file_offset, p.nbytes)]) for p in entry.pieces]
    return dataclasses.replace(entry, pieces=pieces)


def _until(deadline: float) -> timedelta:
    return timedelta(seconds=max(0.01, deadline - time.monotonic()))
