"""The read side of a run dir: which snapshots are committed, their manifests, the newest and the
best, and retention applied to them. Resume, the `dtrain ckpt` commands and export all go
through here; nothing in it needs a process group.

    storage = open_run_dir("runs/demo")              # or "s3://bucket/prefix"
    steps = committed_steps(storage)                 # [200, 400]
    manifest = read_manifest(storage, steps[-1])     # raises CorruptSnapshotError naming the file
    deleted = prune(storage, retention_policy(manifest_config(storage)))
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from dtrain.config import SnapshotConfig, config_from_dict
from dtrain.errors import CorruptSnapshotError, NoSnapshotError
from dtrain.snapshot import layout, retention
from dtrain.snapshot.manifest import MAX_MANIFEST_BYTES, Manifest
from dtrain.storage import Storage, parse_run_dir

logger = logging.getLogger(__name__)


def committed_steps(storage: Storage) -> list[int]:
    """Steps of the committed snapshots in the run dir, oldest first: every `step_N` with a manifest
    entry (one that is not a readable file still counts, so that resume reports it by name)."""
    steps = []
    for name in storage.listdir(layout.SNAPSHOTS):
        step = layout.parse_step_dir(name)
        if step is not None and storage.exists(f"{layout.SNAPSHOTS}/{name}/{layout.MANIFEST}"):
            steps.append(step)
    return sorted(steps)


def uncommitted_step_dirs(storage: Storage) -> list[str]:
    """Names of the `step_N` entries without a manifest: files a save wrote in place (on an object
    store) that were never committed, or the remainder of a deletion a crash interrupted."""
    return [name for name in storage.listdir(layout.SNAPSHOTS)
            if layout.parse_step_dir(name) is not None
            and not storage.exists(f"{layout.SNAPSHOTS}/{name}/{layout.MANIFEST}")]


def read_manifest(storage: Storage, step: int) -> Manifest:
    path = f"{layout.committed_path(step)}/{layout.MANIFEST}"
    try:
        data = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as e:
        raise CorruptSnapshotError(f"{path}: cannot read the manifest ({e})") from None
    manifest = Manifest.from_bytes(data, path)
    if manifest.step != step:
        raise CorruptSnapshotError(f"{path}: manifest says step {manifest.step}, its directory says {step}")
    return manifest


def newest_step(storage: Storage) -> int:
    steps = committed_steps(storage)
    if not steps:
        raise NoSnapshotError(f"{_where(storage)}: no committed snapshot; train first, or check the run dir")
    return steps[-1]


def readable_manifests(storage: Storage) -> dict[int, Manifest]:
    """The manifest of every committed snapshot that reads; a corrupt one is warned about and left out."""
    found = {}
    for step in committed_steps(storage):
        try:
            found[step] = read_manifest(storage, step)
        except CorruptSnapshotError as e:
            logger.warning("%s", e)
    return found


def run_snapshot_config(storage: Storage) -> SnapshotConfig:
    """The `snapshot.*` settings of the newest snapshot that reads: the run's own retention and best metric."""
    manifests = readable_manifests(storage)
    if not manifests:
        raise NoSnapshotError(f"{_where(storage)}: no committed snapshot with a readable manifest")
    return config_from_dict({"snapshot": manifests[max(manifests)].config.get("snapshot", {})}).snapshot


def best_step(storage: Storage, cfg: SnapshotConfig | None = None) -> int:
    """The best committed snapshot by `best_metric` and `best_mode` (the run's own by default)."""
    cfg = cfg or run_snapshot_config(storage)
    infos = [retention.SnapshotInfo(s, m.metrics.get(cfg.best_metric)) for s, m in readable_manifests(storage).items()]
    ranked = retention.best(infos, 1, cfg.best_mode)
    if not ranked:
        raise NoSnapshotError(f"no committed snapshot records the metric {cfg.best_metric!r}; "
                              "export the newest instead (drop --best)")
    return ranked[0].step


def retention_policy(cfg: SnapshotConfig) -> retention.RetentionPolicy:
    return retention.RetentionPolicy(cfg.keep_last, cfg.keep_best, cfg.best_mode, cfg.keep_every)


def prune(storage: Storage, cfg: SnapshotConfig, protected: frozenset[int] = frozenset(),
          nonce: str | None = None) -> list[int]:
    """Delete the committed snapshots that `cfg`'s retention does not keep; returns their steps.
    A snapshot whose manifest does not read has no metric and is kept only by position."""
    infos = []
    for step in committed_steps(storage):
        try:
            metric = read_manifest(storage, step).metrics.get(cfg.best_metric)
        except CorruptSnapshotError:
            metric = None
        infos.append(retention.SnapshotInfo(step, metric))
    doomed = retention.to_delete(infos, retention_policy(cfg), protected)
    for step in doomed:
        delete_snapshot(storage, step, nonce or secrets.token_hex(8))
    return doomed


def delete_snapshot(storage: Storage, step: int, nonce: str) -> None:
    """Make the snapshot invisible in one atomic step (a rename aside; on S3 its manifest deleted
    first), then delete its files at leisure: a crash in between leaves an uncommitted remainder."""
    graveyard = f"{layout.PENDING}/deleting-{layout.step_dir_name(step)}.{nonce}"
    remains = storage.uncommit(layout.committed_path(step), graveyard, layout.MANIFEST)
    storage.remove_tree(remains)
    logger.info("retention deleted %s", layout.step_dir_name(step))


def open_run_dir(where: str | Path) -> Storage:
    """The storage of a run dir (a path or an `s3://` URL); NoSnapshotError if it is not one."""
    storage = parse_run_dir(str(where), "run dir").storage()
    if not storage.exists(layout.SNAPSHOTS):
        raise NoSnapshotError(f"{where}: not a run dir (no {layout.SNAPSHOTS}/ inside); pass the --run-dir of a training run")
    return storage


def resolve(where: str | Path) -> tuple[Storage, int | None]:
    """(storage of its run dir, step) for a snapshot dir `RUN_DIR/snapshots/step_N`; (storage, None) for a run dir."""
    location = parse_run_dir(str(where), "run dir")
    step = layout.parse_step_dir(location.name)
    if step is None:
        return open_run_dir(where), None
    storage = location.parent(2).storage()
    if not storage.exists(layout.committed_path(step)):
        raise NoSnapshotError(f"{where}: no such snapshot directory")
    return storage, step


def snapshot_path(storage: Storage, step: int) -> str:
    """Where a snapshot is, for a person to read."""
    return storage.describe(layout.committed_path(step))


def _where(storage: Storage) -> str:
    return storage.describe()
