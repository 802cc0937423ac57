"""Which committed snapshots to keep: pure policy, no I/O and no torch.

A snapshot is kept when any rule keeps it: it is among the newest `keep_last`, among the best
`keep_best` by the metric, a milestone (`step % keep_every == 0`), or protected by the caller
(in flight, or being restored). The newest snapshot is always kept, whatever the rules say, so a
run can always resume. The decision is made from what the manifests on disk say, so it is the
same after a restart as before it.

Example::

    policy = RetentionPolicy(keep_last=2, keep_best=1, best_mode="min")
    infos = [SnapshotInfo(100, 0.9), SnapshotInfo(200, 0.5), SnapshotInfo(300, 0.7), SnapshotInfo(400, 0.8)]
    to_delete(infos, policy)   # [100]: 300 and 400 are the newest, 200 the best
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SnapshotInfo:
    step: int
    metric: float | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 1
    keep_best: int = 0
    best_mode: str = "min"
    keep_every: int = 0


def to_keep(snapshots: list[SnapshotInfo], policy: RetentionPolicy, protected: frozenset[int] = frozenset()) -> set[int]:
    """The steps to keep."""
    by_step = sorted(snapshots, key=lambda s: s.step)
    keep = {s.step for s in by_step[-max(policy.keep_last, 1):]}
    keep |= {s.step for s in best(by_step, policy.keep_best, policy.best_mode)}
    if policy.keep_every > 0:
        keep |= {s.step for s in by_step if s.step % policy.keep_every == 0}
    return keep | (protected & {s.step for s in by_step})


def to_delete(snapshots: list[SnapshotInfo], policy: RetentionPolicy, protected: frozenset[int] = frozenset()) -> list[int]:
    """The steps to delete, oldest first."""
    keep = to_keep(snapshots, policy, protected)
    return sorted(s.step for s in snapshots if s.step not in keep)


def best(snapshots: list[SnapshotInfo], k: int, mode: str) -> list[SnapshotInfo]:
    """The `k` best snapshots with a finite metric; on equal metrics the earlier step ranks first."""
    if k <= 0:
        return []
    scored = [s for s in snapshots if s.metric is not None and math.isfinite(s.metric)]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda s: (sign * s.metric, s.step))[:k]
