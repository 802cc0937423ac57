"""The timeline read back from metrics.jsonl: attempts, superseded rows, steps gained and replayed, goodput."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.observe import timeline


def _train(step: int, time: float, loss: float | None = None, world: int = 2) -> dict:
    return {"time": time, "step": step, "train_loss": 1.0 / step if loss is None else loss, "world_size": world}


def _snap(step: int, time: float, committed: bool = True, **extra) -> dict:
    return {"time": time, "event": "snapshot", "step": step, "committed": committed, **extra}


# A killed attempt logged steps 1-7 after committing 5; the next resumed from 5 at world size 1 and
# was preempted at 9; the last resumed from 9 and reached 12 of 12.
RUN = [
    {"time": 0.0, "event": "start", "step": 0, "world_size": 2},
    *[_train(s, float(s)) for s in range(1, 6)],
    _snap(5, 5.5),
    *[_train(s, float(s)) for s in (6, 7)],
    {"time": 20.0, "event": "resume", "step": 5, "saved_world_size": 2, "world_size": 1},
    *[_train(s, 20.0 + s, world=1) for s in range(6, 10)],
    {"time": 30.0, "event": "preempted", "step": 9, "signal": "SIGTERM", "world_size": 1},
    _snap(9, 30.0),
    {"time": 40.0, "event": "resume", "step": 9, "saved_world_size": 1, "world_size": 2},
    *[_train(s, 40.0 + s) for s in range(10, 13)],
    _snap(12, 53.0),
]


def test_attempts_their_ends_and_figures() -> None:
    t = timeline.build(RUN, total_steps=12)
    table = [(a.start_step, a.end_step, a.world_size, a.end, a.steps_gained, a.steps_replayed, a.recovery_s)
             for a in t.attempts]
    assert table == [(0, 7, 2, timeline.KILLED, 7, 0, None),
                     (5, 9, 1, timeline.PREEMPTED, 2, 2, 13.0),
                     (9, 12, 2, timeline.FINISHED, 3, 0, 10.0)]
    assert t.attempts[1].signal == "SIGTERM"
    assert [(a.index, before) for a, before in t.world_changes()] == [(2, 2), (3, 1)]
    assert [(a.index, first, last) for a, first, last in t.replayed_spans()] == [(2, 5, 7)]


def test_the_curve_keeps_each_step_once_from_the_attempt_that_trained_it_last() -> None:
    t = timeline.build(RUN)
    kept = [(p.step, p.attempt) for p in t.train if p.kept]
    assert kept == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2), (9, 2), (10, 3), (11, 3), (12, 3)]
    assert [(p.step, p.attempt) for p in t.train if not p.kept] == [(6, 1), (7, 1)]


def test_goodput_counts_kept_steps_over_the_whole_wall_time() -> None:
    g = timeline.build(RUN).goodput()
    assert (g.wall_s, g.steps_kept) == (53.0, 12)
    assert g.steps_per_s == pytest.approx(12 / 53)
    assert g.fault_free_steps_per_s == pytest.approx(1.0)  # one step a second between rows of one attempt
    assert g.ratio == pytest.approx(12 / 53)


@pytest.mark.parametrize(("rows", "total", "ends"), [
    ([], None, []),
    (RUN[:9], None, [timeline.RUNNING]),                           # the only attempt, no record of an end
    (RUN[:9], 7, [timeline.FINISHED]),
    ([*RUN[:3], _snap(3, 3.5, committed=False, error="disk full", fatal=True)], None, [timeline.FAILED]),
    (RUN[:15], 12, [timeline.KILLED, timeline.PREEMPTED]),         # preempted, not yet resumed
])
def test_how_attempts_ended(rows: list[dict], total: int | None, ends: list[str]) -> None:
    assert [a.end for a in timeline.build(rows, total).attempts] == ends


def test_a_log_without_start_events_splits_where_steps_go_back() -> None:
    """An older metrics.jsonl: no start or resume events; a restart shows as a step going backwards."""
    rows = [*[_train(s, float(s)) for s in range(1, 5)], _snap(2, 2.5), *[_train(s, 10.0 + s) for s in range(3, 6)]]
    t = timeline.build(rows)
    assert [(a.start_step, a.end_step, a.end) for a in t.attempts] == [(0, 4, timeline.KILLED),
                                                                        (2, 5, timeline.RUNNING)]
    assert [p.step for p in t.train if p.kept] == [1, 2, 3, 4, 5]


def test_read_rows_skips_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RUN[:3]) + '{"time": 9.0, "step": 3, "train_l')
    assert timeline.read_rows(path) == RUN[:3]
