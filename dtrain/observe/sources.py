"""What the report and the status read from a run dir, touching nothing: its metrics rows, the
manifests of its committed snapshots, the saves in flight, and who holds its lock.

A run dir is what `--run-dir` names (`dtrain.storage.parse_run_dir`): for a local one everything
is in it; for `s3://BUCKET/PREFIX` the snapshots are in the bucket, and `metrics.jsonl` and the lock
in its local dir on rank 0's machine (`RunLocation.local_dir`).

Reading never takes the run dir's lock (even briefly, as `runlock.probe` does): a job starting at
that instant would find it held and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.errors import CorruptSnapshotError, NoSnapshotError
from dtrain.observe import timeline
from dtrain.runlock import LOCK_NAME
from dtrain.snapshot import catalog, layout
from dtrain.snapshot.manifest import Manifest
from dtrain.storage import Storage, parse_run_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingSave:
    step: int
    started_unix: float | None
    """When its directory was created, where the storage tells (a local file system does)."""


@dataclass(frozen=True)
class RunDir:
    url: str
    """The run dir as given: a path or an `s3://` URL."""
    path: Path
    """Its local dir: `metrics.jsonl` and the lock."""
    rows: list[dict[str, Any]]
    manifests: dict[int, Manifest]
    pending: list[PendingSave]
    holder: dict[str, Any] | None
    """The lock file's line (host, pid, since_unix), with `alive`: True/False on this host, None elsewhere."""

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def total_steps(self) -> int | None:
        """`train.steps` of the newest snapshot, if it records one."""
        if not self.manifests:
            return None
        steps = self.manifests[max(self.manifests)].config.get("train", {}).get("steps")
        return steps if isinstance(steps, int) else None

    @property
    def is_running(self) -> bool | None:
        return None if self.holder is None else self.holder.get("alive")

    def timeline(self) -> timeline.Timeline:
        t = timeline.build(self.rows, self.total_steps)
        if self.is_running and t.attempts and t.attempts[-1].end == timeline.RUNNING:
            t.attempts[-1].end = timeline.LIVE
        return t


def read_run_dir(run_dir: str | Path) -> RunDir:
    """Everything observing needs from `run_dir`; NoSnapshotError if it is no run dir."""
    location = parse_run_dir(str(run_dir), "run dir")
    local, storage = location.local_dir(), location.storage()
    metrics = local / layout.METRICS
    steps = catalog.committed_steps(storage)
    if not metrics.is_file() and not steps and not storage.listdir(layout.SNAPSHOTS):
        raise NoSnapshotError(f"{location.url}: not a run dir (neither {metrics} nor a snapshot in "
                              f"{storage.describe(layout.SNAPSHOTS)}); pass the --run-dir of a training run")
    rows = timeline.read_rows(metrics) if metrics.is_file() else []
    return RunDir(location.url, local, rows, _manifests(storage, steps), _pending(storage, local), _holder(local))


def _manifests(storage: Storage, steps: list[int]) -> dict[int, Manifest]:
    """Every committed snapshot's manifest that reads. On a live run retention may delete one
    between the listing and the read: that one is skipped quietly, a corrupt one with a warning."""
    found = {}
    for step in steps:
        try:
            found[step] = catalog.read_manifest(storage, step)
        except CorruptSnapshotError as e:
            if storage.exists(layout.committed_path(step)):
                logger.warning("%s", e)
    return found


def _pending(storage: Storage, local: Path) -> list[PendingSave]:
    """Saves not committed: `step_N.<nonce>` in `.pending/` (retention's `deleting-*` are not saves),
    and `step_N` without a manifest (an object store's saves write in place), oldest first."""
    names = [(f"{layout.PENDING}/{n}", n.split(".", 1)[0]) for n in storage.listdir(layout.PENDING)]
    names += [(f"{layout.SNAPSHOTS}/{n}", n) for n in catalog.uncommitted_step_dirs(storage)]
    found = [PendingSave(step, _created(local / path)) for path, name in names
             if (step := layout.parse_step_dir(name)) is not None]
    return sorted(found, key=lambda p: p.step)


def _created(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except OSError:  # not on this file system (a bucket), or gone since the listing
        return None


def _holder(local: Path) -> dict[str, Any] | None:
    """Who last took the lock, and whether that process still lives (checkable on its own host only)."""
    try:
        holder = json.loads((local / LOCK_NAME).read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    alive = _alive(pid) if host == socket.gethostname() else None
    return {**holder, "alive": alive}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
