from __future__ import annotations

import pytest

from dtrain.snapshot.retention import RetentionPolicy, SnapshotInfo, best, to_delete


def infos(*pairs: tuple[int, float | None]) -> list[SnapshotInfo]:
    return [SnapshotInfo(s, m) for s, m in pairs]


SERIES = infos((10, 0.9), (20, 0.5), (30, 0.7), (40, 0.8), (50, 0.6))


@pytest.mark.parametrize(
    "policy, protected, deleted",
    [
        (RetentionPolicy(keep_last=2), set(), [10, 20, 30]),
        (RetentionPolicy(keep_last=5), set(), []),
        (RetentionPolicy(keep_last=1), set(), [10, 20, 30, 40]),
        (RetentionPolicy(keep_last=0), set(), [10, 20, 30, 40]),  # the newest is kept whatever the rule says
        (RetentionPolicy(keep_last=1, keep_best=1, best_mode="min"), set(), [10, 30, 40]),
        (RetentionPolicy(keep_last=1, keep_best=3, best_mode="min"), set(), [10, 40]),
        (RetentionPolicy(keep_last=1, keep_best=1, best_mode="max"), set(), [20, 30, 40]),
        (RetentionPolicy(keep_last=1, keep_every=20), set(), [10, 30]),
        (RetentionPolicy(keep_last=1, keep_every=25), set(), [10, 20, 30, 40]),
        (RetentionPolicy(keep_last=1), {30}, [10, 20, 40]),
        (RetentionPolicy(keep_last=2, keep_best=1, keep_every=40), {10}, [30]),
    ],
)
def test_to_delete(policy: RetentionPolicy, protected: set[int], deleted: list[int]) -> None:
    assert to_delete(SERIES, policy, frozenset(protected)) == deleted


def test_protected_step_that_is_not_committed_changes_nothing() -> None:
    assert to_delete(SERIES, RetentionPolicy(keep_last=4), frozenset({99})) == [10]


@pytest.mark.parametrize(
    "snapshots, k, mode, expected",
    [
        (infos((1, None), (2, 0.3), (3, float("nan")), (4, 0.1)), 5, "min", [4, 2]),  # no metric: never best
        (infos((1, 0.5), (2, 0.5), (3, 0.5)), 2, "min", [1, 2]),  # ties: the earlier step first
        (infos((1, 0.5), (2, float("inf")), (3, 0.7)), 1, "max", [3]),
        (infos((1, 0.5)), 0, "min", []),
        ([], 3, "min", []),
    ],
)
def test_best(snapshots: list[SnapshotInfo], k: int, mode: str, expected: list[int]) -> None:
    assert [s.step for s in best(snapshots, k, mode)] == expected


def test_unsorted_input_is_ordered_by_step() -> None:
    shuffled = [SERIES[3], SERIES[0], SERIES[4], SERIES[1], SERIES[2]]
    assert to_delete(shuffled, RetentionPolicy(keep_last=2)) == [10, 20, 30]
