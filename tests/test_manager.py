"""The snapshot manager in one process: what a start cleans up, and when `every_steps = "auto"` saves."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from dtrain.config import SnapshotConfig
from dtrain.dist import solo_context
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.interval import SaveCostMeter, young_daly_steps
from dtrain.snapshot.manager import SnapshotManager
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.policy import AUTO_FIRST_STEP, EverySeconds, Progress, YoungDaly, policies_from
from dtrain.storage import LocalStorage

STEP_SECONDS = 0.01


def _state() -> dict:
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _save(manager: SnapshotManager, step: int):
    return manager.save(step, _state(), {"rng": {"torch": torch.get_rng_state()}}, SnapshotMeta({"step": step}),
                        "interval")


def _digest(run_dir: Path) -> dict[str, str]:
    """Every committed file (and `latest`) with a hash of its bytes."""
    snaps = run_dir / layout.SNAPSHOTS
    files = [p for p in snaps.rglob("*") if p.is_file() and layout.PENDING not in p.relative_to(run_dir).as_posix()]
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if not p.name.startswith(".")}


# -- start-up cleanup --------------------------------------------------------------------------

@pytest.mark.parametrize("rank, cleans", [(0, True), (1, False)])
def test_a_start_removes_what_killed_saves_left_and_keeps_every_committed_snapshot(
        tmp_path: Path, rank: int, cleans: bool) -> None:
    storage = LocalStorage(tmp_path)
    first = SnapshotManager(storage, SnapshotConfig(every_steps=5, staging="copy"), solo_context())
    first.prepare_run_dir()
    for step in (5, 10):
        _save(first, step)
    first.wait()
    committed = _digest(tmp_path)
    # A SIGKILL inside write_atomic while replacing `latest`, and one while writing shards.
    stray = tmp_path / layout.SNAPSHOTS / ".latest.tmp-424242"
    stray.write_text("step_000000015\n")
    abandoned = tmp_path / layout.PENDING / "step_000000015.0123456789abcdef"
    abandoned.mkdir(parents=True)
    (abandoned / "replicated-00000.bin").write_bytes(b"\0" * 100)
    (abandoned / ".manifest.json.tmp-424242").write_text("{")

    ctx = dataclasses.replace(solo_context(), rank=rank)  # rank 1 of a group: only rank 0 cleans
    SnapshotManager(storage, SnapshotConfig(every_steps=5), ctx).prepare_run_dir()

    assert stray.exists() is not cleans
    assert abandoned.exists() is not cleans
    assert _digest(tmp_path) == committed  # every committed file and `latest`, byte for byte
    assert catalog.committed_steps(storage) == [5, 10]
    assert reader.verify(storage, 10) == []
    assert (tmp_path / layout.LATEST).read_text() == "step_000000010\n"


def test_only_write_atomic_temp_files_are_removed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    keep = ["latest", "step_000000003", ".latest.tmp-", ".latest.tmp-12x", "notes.tmp-12", ".hidden"]
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.tmp-7").mkdir()
    (tmp_path / ".latest.tmp-31337").write_text("x")
    assert storage.remove_temp_files(".") == [".latest.tmp-31337"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, ".dir.tmp-7"])


# -- every_steps = "auto" ------------------------------------------------------------------------

@pytest.mark.parametrize("save, write, mtbf, step, steps", [
    (0.5, 0.0, 3600, 1.0, 60),      # sqrt(2 * 0.5 * 3600) = 60 s
    (0.5, 0.0, 3600, 0.25, 240),    # the same 60 s in shorter steps
    (2.0, 1.0, 100, 2.0, 10),       # sqrt(2 * 2 * 100) = 20 s, longer than the write
    (0.001, 9.0, 3600, 0.25, 36),   # optimum 2.7 s, but a write takes 9 s: never save faster than that
    (0.001, 9.1, 3600, 0.25, 37),   # rounded up, so the interval still covers the write
    (0.0, 0.0, 3600, 0.5, 1),       # a free save: every step, not never
])
def test_young_daly_interval_in_steps(save: float, write: float, mtbf: float, step: float, steps: int) -> None:
    assert young_daly_steps(save, write, mtbf, step) == steps


def test_a_save_costs_what_its_iterations_took_beyond_clean_ones() -> None:
    meter = SaveCostMeter()
    for seconds in [0.5] + [0.010] * 10 + [0.012] * 9:  # a slow first step (warm-up) moves no median
        meter.observe(seconds, in_flight=False)
    assert meter.step_seconds == pytest.approx(0.011) and meter.save_seconds is None
    meter.save_started(stall_seconds=0.004)
    meter.observe(0.061, in_flight=True)   # evaluation and stall: 0.05 extra
    meter.observe(0.031, in_flight=True)   # copy-on-write faults, the writer's CPU: 0.02 extra
    assert meter.save_seconds is None      # not known while the save runs
    meter.observe(0.016, in_flight=False)  # committed during this one: 0.005 extra
    assert meter.save_seconds == pytest.approx(0.075)
    meter.observe(0.011, in_flight=False)  # clean again: the baseline, not the cost
    assert meter.save_seconds == pytest.approx(0.075)


def test_the_save_cost_is_a_median_of_recent_saves_and_never_below_the_stall() -> None:
    meter = SaveCostMeter()
    for _ in range(5):
        meter.observe(0.010, in_flight=False)
    for extra in (0.04, -0.005, 0.02, 0.9, 0.03):  # one faster than clean (noise), one hit by a stray stall
        meter.save_started(stall_seconds=0.003)
        meter.observe(0.010 + extra, in_flight=False)
    assert meter.save_seconds == pytest.approx(0.03)  # median of 0.04, 0.003, 0.02, 0.9, 0.03


def test_a_save_hidden_by_noisy_steps_still_costs_its_stall_so_a_long_mtbf_keeps_a_long_interval() -> None:
    meter = SaveCostMeter()
    for seconds in (0.010, 0.030, 0.030):  # clean steps on a busy machine: median 0.03
        meter.observe(seconds, in_flight=False)
    meter.save_started(stall_seconds=0.0005)
    meter.observe(0.012, in_flight=False)  # the save's iteration happened to be a fast one
    assert meter.save_seconds == 0.0005
    # A cost of 0 would make sqrt(2 * C * MTBF) zero: a save every step, whatever the MTBF.
    assert young_daly_steps(meter.save_seconds, 0.002, 1e9, meter.step_seconds) == math.ceil(1000 / 0.03)


def test_a_save_started_before_the_last_committed_closes_its_measurement() -> None:
    meter = SaveCostMeter()
    meter.observe(0.010, in_flight=False)
    meter.save_started(stall_seconds=0.001)
    meter.observe(0.030, in_flight=True)
    meter.save_started(stall_seconds=0.001)  # the next save, while the first still writes: it gets the iterations from here
    meter.observe(0.050, in_flight=False)
    assert meter.save_seconds == pytest.approx((0.02 + 0.04) / 2)


def test_auto_before_any_measurement_saves_after_the_bootstrap_interval() -> None:
    auto = YoungDaly(mtbf_seconds=3600)
    assert auto.interval() is None
    assert [s for s in range(1, 3 * AUTO_FIRST_STEP) if auto.is_due(Progress(s))][0] == AUTO_FIRST_STEP
    auto.observe(STEP_SECONDS, saving=False)  # a step time alone is no save cost: still the bootstrap
    assert auto.interval() is None and auto.is_due(Progress(AUTO_FIRST_STEP))


class GatedStorage(LocalStorage):
    """A disk whose shard writes wait for `gate`: a save that stays in flight as long as a test wants."""

    def __init__(self, root: Path, gate: threading.Event) -> None:
        super().__init__(root)
        self.gate = gate

    def open_write(self, path: str):
        self.gate.wait(30)
        return super().open_write(path)


@pytest.mark.parametrize("mtbf", [0.5, 3600.0])  # a write-bound interval, then a Young/Daly-bound one
def test_auto_after_a_resume_counts_from_the_resumed_step_then_follows_the_measured_save(
        tmp_path: Path, mtbf: float) -> None:
    cfg = SnapshotConfig(every_steps="auto", mtbf_seconds=mtbf, staging="copy")
    resumed = 37
    before = SnapshotManager(LocalStorage(tmp_path), cfg, solo_context())
    before.prepare_run_dir()
    _save(before, resumed)
    before.wait()

    gate = threading.Event()
    manager = SnapshotManager(GatedStorage(tmp_path, gate), cfg, solo_context())  # the restarted process
    manager.prepare_run_dir()
    assert manager.restore_latest() is not None and manager.last_started_step == resumed
    [auto] = policies_from(cfg, start_step=resumed)
    bootstrap = resumed + AUTO_FIRST_STEP
    due = []
    for step in range(resumed + 1, bootstrap + 1):
        due += [step] if auto.is_due(Progress(step)) else []
        auto.observe(STEP_SECONDS, saving=False)
    assert due == [bootstrap]

    pending = _save(manager, bootstrap)
    auto.saved(Progress(bootstrap))
    auto.save_started(stall_seconds=0.0001)
    auto.observe(STEP_SECONDS + 0.04, saving=True)  # the iteration that saved, 40 ms slower than clean
    assert not auto.is_due(Progress(bootstrap + 10_000))  # no second save while the first is measured
    auto.observe(STEP_SECONDS + 0.02, saving=True)  # still writing: slowed by it
    time.sleep(0.3)
    gate.set()
    result = pending.wait()
    auto.write_seconds = result.commit_seconds
    auto.observe(STEP_SECONDS + 0.01, saving=False)  # the one it committed in

    assert auto.meter.save_seconds == pytest.approx(0.07)  # its stall, microseconds, is less
    seconds = max(math.sqrt(2 * 0.07 * mtbf), result.commit_seconds)
    interval = math.ceil(seconds / STEP_SECONDS)
    assert auto.interval() == interval
    assert interval * STEP_SECONDS >= result.commit_seconds >= 0.3  # never sooner than the write took
    due = [s for s in range(bootstrap + 1, bootstrap + interval + 1) if auto.is_due(Progress(s))]
    assert due == [bootstrap + interval]  # counted from the last save
    manager.wait()


@pytest.mark.parametrize("cfg, step, epoch_ended, now, due", [
    (SnapshotConfig(every_steps=5), 10, False, 0.0, ["interval"]),
    (SnapshotConfig(every_steps=5), 11, False, 0.0, []),
    (SnapshotConfig(every_steps=0), 10, False, 0.0, []),
    (SnapshotConfig(every_steps=0, every_seconds=30), 1, False, 31.0, ["time"]),
    (SnapshotConfig(every_steps=0, every_seconds=30), 1, False, 29.0, []),
    (SnapshotConfig(every_steps=7, at_epoch_end=True), 3, True, 0.0, ["epoch end"]),
    (SnapshotConfig(every_steps=3, at_epoch_end=True), 3, True, 0.0, ["interval", "epoch end"]),
], ids=["every-n", "not-n", "never", "seconds", "not-yet", "epoch-end", "both"])
def test_save_policies(cfg: SnapshotConfig, step: int, epoch_ended: bool, now: float, due: list[str]) -> None:
    policies = policies_from(cfg)
    for p in policies:
        if isinstance(p, EverySeconds):
            p.last = 0.0
    assert [p.reason for p in policies if p.is_due(Progress(step, epoch_ended, now))] == due
