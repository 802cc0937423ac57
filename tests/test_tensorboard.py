"""TensorBoard scalars, read back with TensorBoard's own reader: a resumed curve has each step once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dtrain.config import load_config
from dtrain.observe import tensorboard, timeline
from dtrain.progress import MetricsLog, ProgressLog
from dtrain.snapshot import layout
from tests import report_run
from tests.test_report_timeline import RUN


def _read(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / tensorboard.TB_DIR))
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_rows_become_scalars_and_a_resume_supersedes_what_the_killed_attempt_logged(tmp_path: Path) -> None:
    tensorboard.open_board(tmp_path)
    log = MetricsLog(tmp_path / layout.METRICS)
    try:
        for row in RUN:
            log.record({k: v for k, v in row.items() if k != "time"})
    finally:
        tensorboard.close_board(tmp_path)
    acc = _read(tmp_path)
    assert _steps(acc, "train/loss") == list(range(1, 13))  # steps 6 and 7 once, though logged twice
    kept = {p.step: p.value for p in timeline.build(RUN).train if p.kept}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([kept[s] for s in range(1, 13)])
    assert _steps(acc, "snapshot/failed") == [5, 9, 12]
    assert {"events/start/text_summary", "events/resume/text_summary", "events/preempted/text_summary"} \
        == set(acc.Tags()["tensors"])


def test_no_board_unless_asked_for(tmp_path: Path) -> None:
    assert load_config(None).report.tensorboard is True
    assert load_config(None, ["report.tensorboard=false"]).report.tensorboard is False
    progress = ProgressLog(tmp_path / layout.METRICS, 10, 0, enabled=True, every=1, tensorboard_log=False)
    progress.record({"step": 1, "train_loss": 1.0})
    progress.close()
    assert (tmp_path / layout.METRICS).exists() and not (tmp_path / tensorboard.TB_DIR).exists()


@pytest.mark.slow
def test_the_faulty_run_reads_back_as_one_curve(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two SIGKILLs, a preemption and a world-size change: each step once, the values of the rows that count."""
    run_dir = report_run.shared_run(tmp_path_factory)
    t = timeline.build(timeline.read_rows(run_dir / layout.METRICS))
    assert any(not p.kept for p in t.train), "the run should have replayed steps"
    acc = _read(run_dir)
    kept = [p for p in t.train if p.kept]
    assert _steps(acc, "train/loss") == [p.step for p in kept] == list(range(1, t.step + 1))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([p.value for p in kept])
    assert _steps(acc, "run/world_size")[-1] == t.step
    assert acc.Scalars("run/world_size")[-1].value == 1
    committed = sorted({s.step for s in t.snapshots if s.committed})
    assert _steps(acc, "snapshot/write_s") == committed
