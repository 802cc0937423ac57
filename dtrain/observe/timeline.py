"""What happened in a run, read back from its `metrics.jsonl`: attempts, one loss curve, goodput.

An *attempt* is one start of the training processes: it opens with a `start` event (no snapshot
to resume) or a `resume` event (from step k), and ends with its last record. A killed attempt may
have logged steps past the snapshot its successor resumes from; those rows are *superseded*: the
curve keeps each step once, from the attempt that trained it last, so it never goes backwards.

    timeline = build(read_rows(run_dir / "metrics.jsonl"), total_steps=400)
    [a.end for a in timeline.attempts]     # ['killed', 'preempted', 'finished']
    timeline.goodput()                     # steps kept per wall second against the fault-free rate

Pure: no torch, no process group; a partial last line (a run writing it now) is skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

START_EVENTS = ("start", "resume")

# How an attempt ended, as the report and status name it.
FINISHED, RUNNING, PREEMPTED, FAILED, KILLED = "finished", "unfinished", "preempted", "failed", "killed"
LIVE = "running"
"""An unfinished last attempt whose process is known to live (the run dir's lock holder; see `sources`)."""
END_MEANING = {
    FINISHED: "reached train.steps",
    RUNNING: "still running, or stopped without a record",
    LIVE: "running now",
    PREEMPTED: "preempted: snapshot committed, exit 75",
    FAILED: "stopped by failed saves",
    KILLED: "lost with no record (SIGKILL, OOM, a lost node or peer, a crash)",
}


@dataclass(frozen=True)
class Point:
    step: int
    time: float
    value: float
    attempt: int
    kept: bool
    """False when a later attempt trained this step again (the row is superseded)."""


@dataclass(frozen=True)
class SnapshotRecord:
    step: int
    time: float
    attempt: int
    committed: bool
    row: dict[str, Any]
    """The `snapshot` event as logged (bytes, stall_s, write_s, interval_steps, error...)."""


@dataclass
class Attempt:
    index: int
    """1 for the first start of the run."""
    start_time: float
    start_step: int
    """The step resumed from (0 for a fresh start)."""
    world_size: int | None
    resumed: bool
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    end_time: float = 0.0
    end_step: int = 0
    """The highest step it recorded."""
    end: str = RUNNING
    signal: str | None = None
    steps_gained: int = 0
    """Steps past every earlier attempt's reach."""
    steps_replayed: int = 0
    """Steps an earlier attempt had already trained, trained again."""
    recovery_s: float | None = None
    """From the previous attempt's last record to this one's first step (its start event)."""


@dataclass(frozen=True)
class Goodput:
    wall_s: float
    steps_kept: int
    steps_per_s: float
    fault_free_steps_per_s: float | None
    """The rate between consecutive train rows of one attempt: training with saves, without restarts."""

    @property
    def ratio(self) -> float | None:
        if not self.fault_free_steps_per_s:
            return None
        return self.steps_per_s / self.fault_free_steps_per_s


@dataclass
class Timeline:
    attempts: list[Attempt]
    train: list[Point]
    val: list[Point]
    snapshots: list[SnapshotRecord]
    events: list[tuple[int, dict[str, Any]]]
    """(attempt, row) of every event but snapshots: start, resume, preempted and any other."""

    @property
    def step(self) -> int:
        """The step the run has reached and kept."""
        return self.attempts[-1].end_step if self.attempts else 0

    @property
    def world_size(self) -> int | None:
        return self.attempts[-1].world_size if self.attempts else None

    def world_changes(self) -> list[tuple[Attempt, int | None]]:
        """(attempt, previous world size) where an attempt started at another world size."""
        return [(b, a.world_size) for a, b in pairwise(self.attempts)
                if a.world_size and b.world_size and a.world_size != b.world_size]

    def replayed_spans(self) -> list[tuple[Attempt, int, int]]:
        """(attempt, first step, last step) of the steps each attempt trained again."""
        return [(a, a.start_step, a.start_step + a.steps_replayed) for a in self.attempts if a.steps_replayed]

    def goodput(self) -> Goodput:
        if not self.attempts:
            return Goodput(0.0, 0, 0.0, None)
        wall = max(self.attempts[-1].end_time - self.attempts[0].start_time, 0.0)
        kept = self.step - self.attempts[0].start_step
        return Goodput(wall, kept, kept / wall if wall > 0 else 0.0, _fault_free_rate(self.train))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of `metrics.jsonl`, in order; a line that does not parse (one being written) is skipped."""
    rows = []
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("time"), int | float):
                rows.append(row)
    return rows


def build(rows: list[dict[str, Any]], total_steps: int | None = None) -> Timeline:
    """The timeline of a run from its rows; `total_steps` (train.steps) tells a finished run from a stopped one."""
    attempts = _split(rows)
    for a in attempts:
        _close(a)
    _account(attempts, total_steps)
    train = _points(attempts, "train_loss")
    val = _points(attempts, "val_loss")
    snapshots = [SnapshotRecord(int(r["step"]), r["time"], a.index, bool(r.get("committed")), r)
                 for a in attempts for r in a.rows if r.get("event") == "snapshot"]
    events = [(a.index, r) for a in attempts for r in a.rows if r.get("event") not in (None, "snapshot")]
    return Timeline(attempts, train, val, snapshots, events)


def _split(rows: list[dict[str, Any]]) -> list[Attempt]:
    """Attempts from their start events; a step going backwards without one (an older log) starts one too."""
    attempts: list[Attempt] = []
    for row in rows:
        event, step = row.get("event"), _step(row)
        if event in START_EVENTS:
            attempts.append(Attempt(len(attempts) + 1, row["time"], step or 0, row.get("world_size"),
                                    resumed=event == "resume"))
        elif not attempts or ("train_loss" in row and step is not None and step <= _last_trained(attempts[-1])):
            start = _resumable_step(attempts, step or 0)
            attempts.append(Attempt(len(attempts) + 1, row["time"], start, row.get("world_size"), resumed=start > 0))
        current = attempts[-1]
        current.rows.append(row)
        if current.world_size is None and row.get("world_size"):
            current.world_size = row["world_size"]
    return attempts


def _step(row: dict[str, Any]) -> int | None:
    step = row.get("step")
    return int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None


def _reached(a: Attempt) -> int:
    return max([a.start_step, *(s for r in a.rows if (s := _step(r)) is not None)])


def _last_trained(a: Attempt) -> int:
    """The last step with a train row in `a` (each step has at most one per attempt)."""
    return max([a.start_step, *(s for r in a.rows if "train_loss" in r and (s := _step(r)) is not None)])


def _resumable_step(attempts: list[Attempt], first_step: int) -> int:
    """Where an attempt with no start event resumed: the newest snapshot committed before its first row."""
    committed = [int(r["step"]) for a in attempts for r in a.rows
                 if r.get("event") == "snapshot" and r.get("committed") and r["step"] < first_step]
    return max(committed, default=0)


def _close(a: Attempt) -> None:
    a.end_time = max((r["time"] for r in a.rows), default=a.start_time)
    a.end_step = _reached(a)
    preempted = [r for r in a.rows if r.get("event") == "preempted"]
    fatal = [r for r in a.rows if r.get("event") == "snapshot" and r.get("fatal")]
    if preempted:
        a.end, a.signal = PREEMPTED, preempted[-1].get("signal")
    elif fatal:
        a.end = FAILED


def _account(attempts: list[Attempt], total_steps: int | None) -> None:
    """Steps gained and replayed, recovery times, and how each attempt without a record of its end ended."""
    frontier = attempts[0].start_step if attempts else 0
    for prev, a in zip([None, *attempts], attempts, strict=False):
        a.steps_replayed = max(0, min(frontier, a.end_step) - a.start_step)
        a.steps_gained = max(0, a.end_step - max(frontier, a.start_step))
        frontier = max(frontier, a.end_step)
        if prev is not None:
            a.recovery_s = a.start_time - prev.end_time
            if prev.end == RUNNING:
                prev.end = KILLED
    if attempts and attempts[-1].end == RUNNING and total_steps is not None and attempts[-1].end_step >= total_steps:
        attempts[-1].end = FINISHED


def _points(attempts: list[Attempt], key: str) -> list[Point]:
    """Every row carrying `key`; kept unless a later attempt started before its step (and so redid it)."""
    points, redo_from = [], math.inf
    for a in reversed(attempts):
        for r in reversed(a.rows):
            value, step = r.get(key), _step(r)
            if isinstance(value, int | float) and step is not None:
                points.append(Point(step, r["time"], float(value), a.index, kept=step <= redo_from))
        redo_from = min(redo_from, a.start_step)
    return points[::-1]


def _fault_free_rate(train: list[Point]) -> float | None:
    """Steps per second between consecutive train rows of the same attempt."""
    steps = seconds = 0.0
    for a, b in pairwise(train):
        if a.attempt == b.attempt and b.step > a.step and b.time > a.time:
            steps += b.step - a.step
            seconds += b.time - a.time
    return steps / seconds if seconds > 0 else None
