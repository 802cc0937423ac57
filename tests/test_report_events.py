"""The events the report and TensorBoard read: a `start`, and one `snapshot` event per save, committed or failed."""

from __future__ import annotations

import errno
from pathlib import Path

import torch

import dtrain
from dtrain.observe import timeline
from dtrain.observe.runreport import render
from dtrain.observe.sources import read_run_dir
from dtrain.snapshot import layout
from dtrain.storage import LocalStorage


class FullAtStep(LocalStorage):
    """A disk that is full while the save of one step writes."""

    def __init__(self, root: Path, step: int) -> None:
        super().__init__(root)
        self.marker = f"{layout.step_dir_name(step)}."

    def open_write(self, path: str):
        if self.marker in path:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        return super().open_write(path)


def test_each_save_is_recorded_with_its_timings_or_its_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 2)
    snap = dtrain.Snapshotter(tmp_path, every_steps=2, keep_last=5, storage=FullAtStep(tmp_path, 4))
    state = {"model": model}
    assert snap.restore(state) == 0
    for step in range(1, 7):
        snap.step(step, state)
    snap.close(6, state)
    rows = timeline.read_rows(tmp_path / layout.METRICS)
    assert rows[0]["event"] == "start" and rows[0]["world_size"] == 1
    saves = [r for r in rows if r.get("event") == "snapshot"]
    assert [(r["step"], r["committed"]) for r in saves] == [(2, True), (4, False), (6, True)]
    for r in (saves[0], saves[2]):
        assert r["bytes"] > 8 * 2 * 4 and r["stall_s"] >= 0 and r["write_s"] > 0 and r["interval_steps"] == 2
        assert r["path"] == layout.committed_path(r["step"])
    assert "No space left on device" in saves[1]["error"] and saves[1]["fatal"] is False

    html = render(read_run_dir(tmp_path))
    assert '<tr data-event="save-failed" data-step="4">' in html
    assert '<g id="save-failed-4">' in html and '<g id="snapshot-6">' in html
