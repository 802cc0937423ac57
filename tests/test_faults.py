"""Storage faults during a save: a full disk, a read-only disk, a very slow disk. Nothing committed is lost."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtrain.snapshot import catalog, layout, reader
from dtrain.storage import LocalStorage
from support.procs import wait_for
from tests.distributed import run_ranks
from tests.workloads import train, train_on_slow_disk

BIG = ["task.options.hidden=512", "snapshot.every_steps=10", "snapshot.keep_last=1", "train.steps=30",
       "snapshot.max_consecutive_failures=2"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs: room for one snapshot of the BIG model (about 3.6 MB) and not for a second one next to it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_mb: int) -> None:
    """Leave about `leave_mb` MiB free on the tmpfs."""
    free = int(subprocess.run(["df", "--output=avail", "-k", str(disk)], capture_output=True, text=True).stdout.split()[-1])
    (disk / "filler").write_bytes(b"\0" * max(0, (free - leave_mb * 1024) * 1024))


def test_disk_full_keeps_the_committed_snapshot_and_stops_after_repeated_failures(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    _fill(small_disk, leave_mb=6)
    results = run_ranks(train, 2, str(run_dir), BIG)
    for r in results:
        assert r["error"] and "No space left on device" in r["error"], r["error"]
        assert "2 failed save(s) in a row" in r["error"]
    storage = LocalStorage(run_dir)
    assert catalog.committed_steps(storage) == [10]
    assert reader.verify(storage, 10) == []
    assert storage.listdir(layout.PENDING) == []  # the partial saves were removed
    (small_disk / "filler").unlink()  # space comes back: the next start resumes from the snapshot that survived
    resumed = run_ranks(train, 2, str(run_dir), BIG)
    assert [r["resumed_from"] for r in resumed] == [10, 10] and all(r["error"] is None for r in resumed)
    assert catalog.committed_steps(storage) == [30]


def test_read_only_disk_mid_run_damages_nothing(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    outcome: dict[str, list] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("r", run_ranks(
        train, 2, str(run_dir), [*BIG, "task.options.num_samples=4000", "train.steps=60"])))
    worker.start()
    wait_for(lambda: (run_dir / "snapshots" / "step_000000010" / "manifest.json").exists(), 120, "the first commit")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        worker.join(timeout=240)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert not worker.is_alive()
    for r in outcome["r"]:
        assert r["error"] and "Read-only file system" in r["error"], r["error"]
    storage = LocalStorage(run_dir)
    committed = catalog.committed_steps(storage)
    assert committed and all(reader.verify(storage, s) == [] for s in committed)


def test_slow_disk_does_not_stall_training(tmp_path: Path) -> None:
    results = run_ranks(train_on_slow_disk, 2, str(tmp_path), ["train.steps=40", "snapshot.every_steps=10", "snapshot.staging=\"copy\""], 0.4)
    for r in results:
        assert r["steps"] == 40 and r["writes"] >= 4
        assert r["overlapped"] >= 4, "training did not go on while shards were written"
    storage = LocalStorage(tmp_path)
    assert catalog.committed_steps(storage)[-1] == 40
    assert all(reader.verify(storage, s) == [] for s in catalog.committed_steps(storage))
