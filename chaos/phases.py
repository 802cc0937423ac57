"""Which phase of a save a run is in, read from its run dir and rank 0's log.

Each phase of the commit protocol (dtrain/snapshot/writer.py) leaves a signature:

    phase              signature
    step               no save in flight
    staging            rank 0 logged 'snapshot of step N (...) staging'; no .pending/step_N.* yet
    write              .pending/step_N.<nonce>/ exists, some shard missing or short
    shards written     every shard at full size, no manifest.json yet (reports, manifest being written)
    manifest written   .pending/step_N.<nonce>/manifest.json exists (dir fsync, then the rename)
    latest update      step_N renamed into place (the commit point); rank 0 has not yet logged the
                       commit, which it does right after fsyncing `snapshots/` and replacing `latest`
    retention delete   .pending/deleting-step_M.<nonce>/ exists (renamed away, files being removed)

Shard sizes come from a committed manifest (the same files every save at one world size); before
the first commit, a complete set of shards cannot be told from a partial one and reads as `write`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dtrain.snapshot import layout
from dtrain.snapshot.manifest import Manifest

STEP, STAGING, WRITE, SHARDS, MANIFEST, LATEST, RETENTION = (
    "step", "staging", "write", "shards written", "manifest written", "latest update", "retention delete")
PHASES = (STEP, STAGING, WRITE, SHARDS, MANIFEST, LATEST, RETENTION)
RANK0_ONLY = frozenset({SHARDS, MANIFEST, LATEST, RETENTION})
"""Phases only rank 0 acts in (gathering reports, manifest, rename, `latest`, retention)."""

_STAGING = re.compile(r"snapshot of step (\d+) \(.*\) staging")
_COMMITTED = re.compile(r"snapshot step (\d+) committed")


@dataclass(frozen=True)
class RunDirState:
    """A listing of `snapshots/` at one instant, with what rank 0 last logged about saves."""

    step_dirs: dict[int, frozenset[str]]
    """Every `step_*` dir and the names in it (a committed one holds manifest.json)."""
    pending: dict[str, dict[str, int]]
    """Every `.pending/` entry and its files' sizes."""
    latest: str | None
    litter: tuple[str, ...]
    """Temp files in `snapshots/` itself (a `latest` replacement in progress, or one a crash left)."""
    staging_step: int | None
    """The step of rank 0's newest 'staging' line in this launch."""
    logged_commits: frozenset[int]

    @property
    def committed(self) -> list[int]:
        return sorted(s for s, names in self.step_dirs.items() if layout.MANIFEST in names)


class LogWatch:
    """Follows a log file as it grows, keeping what rank 0 said about saves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[str] = []
        self.staging_step: int | None = None
        self.commits: set[int] = set()

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        new = [line.decode(errors="replace") for line in complete]
        for line in new:
            if m := _STAGING.search(line):
                self.staging_step = int(m.group(1))
            elif m := _COMMITTED.search(line):
                self.commits.add(int(m.group(1)))
        self.lines += new
        return new

    def text(self) -> str:
        return "\n".join(self.lines)


def observe(run_dir: Path, log: LogWatch) -> RunDirState:
    """Read the run dir now (cheap enough to call every millisecond).

    The log is read after the listing: rank 0 logs a commit only after the rename, so a step dir
    listed before a log without its commit line really was in its `latest update` phase.
    """
    snaps = run_dir / layout.SNAPSHOTS
    step_dirs: dict[int, frozenset[str]] = {}
    litter = []
    for name in _listdir(snaps):
        step = layout.parse_step_dir(name)
        if step is not None:
            step_dirs[step] = frozenset(_listdir(snaps / name))
        if name.startswith(".") and name != ".pending":
            litter.append(name)
    pending = {name: _sizes(run_dir / layout.PENDING / name) for name in _listdir(run_dir / layout.PENDING)}
    log.poll()
    return RunDirState(step_dirs, pending, _read_latest(run_dir), tuple(sorted(litter)), log.staging_step,
                       frozenset(log.commits))


def classify(state: RunDirState, shard_sizes: dict[str, int] | None) -> str:
    """The phase a run dir shows; see the module docstring for each signature."""
    if any(name.startswith("deleting-") for name in state.pending):
        return RETENTION
    saving = state.staging_step
    if saving is not None and saving in state.committed and saving not in state.logged_commits:
        return LATEST  # renamed into place; rank 0 logs the commit only after replacing `latest`
    if saving is not None and saving not in state.step_dirs:
        files = _pending_save(state, saving)
        if files is not None:
            if layout.MANIFEST in files:
                return MANIFEST
            if shard_sizes and all(files.get(n) == size for n, size in shard_sizes.items()):
                return SHARDS
            return WRITE
        if saving not in state.logged_commits:
            return STAGING
    return STEP


def shard_sizes(run_dir: Path, step: int) -> dict[str, int]:
    """{file: bytes} of a committed snapshot's shards, from its manifest."""
    return manifest_files(run_dir / layout.committed_path(step))


def manifest_files(snapshot: Path) -> dict[str, int]:
    """{file: bytes} that a snapshot dir's manifest lists, read and checked as a resume reads it."""
    path = snapshot / layout.MANIFEST
    return {name: f.bytes for name, f in Manifest.from_bytes(path.read_bytes(), str(path)).files.items()}


def describe(state: RunDirState) -> str:
    """One line for a failure message: what the run dir held at the kill."""
    dirs = " ".join(f"{layout.step_dir_name(s)}{'' if layout.MANIFEST in n else '(no manifest)'}"
                    for s, n in sorted(state.step_dirs.items()))
    pending = " ".join(f"{k}[{','.join(sorted(v))}]" for k, v in sorted(state.pending.items()))
    return f"snapshots: {dirs or '-'}; latest={state.latest}; .pending: {pending or '-'}; saving={state.staging_step}"


def _pending_save(state: RunDirState, step: int) -> dict[str, int] | None:
    prefix = layout.step_dir_name(step) + "."
    return next((files for name, files in state.pending.items() if name.startswith(prefix)), None)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sizes(path: Path) -> dict[str, int]:
    sizes = {}
    for name in _listdir(path):
        try:
            sizes[name] = os.stat(path / name).st_size
        except FileNotFoundError:
            pass
    return sizes


def _read_latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / layout.LATEST).read_text().strip()
    except FileNotFoundError:
        return None
