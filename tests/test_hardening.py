"""Regressions through the public path: a resume holds exactly what was saved, or refuses loudly.

Each test names the failure it guards against: an altered manifest, special files in a snapshot,
sizes that would exhaust memory, a writer that never reports, an error after the commit point,
a config change on resume, a second job on the same run dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from dtrain.dist import solo_context
from dtrain.errors import SnapshotError
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.manifest import with_header
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage
from support.procs import wait_for
from tests.conftest import REPO, dtrain_cmd, run

SMALL = ["--set", "task.options.num_samples=480", "--set", "task.options.eval_samples=64",
         "--set", "task.options.hidden=32", "--set", "train.global_batch_size=32",
         "--set", "train.log_every_steps=1000", "--set", "snapshot.every_steps=5", "--set", "snapshot.keep_last=5"]


def _train(run_dir: Path, steps: int, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run(dtrain_cmd("train", "--run-dir", str(run_dir), *SMALL, "--set", f"train.steps={steps}", *extra),
               timeout=timeout)


def _snap(run_dir: Path, step: int) -> Path:
    return run_dir / layout.committed_path(step)


def _resumed_from(out: str) -> int | None:
    marker = "resumed from snapshot step "
    return int(out.split(marker, 1)[1].split()[0]) if marker in out else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with snapshots at steps 5 and 10 (single process), copied by each test that tampers."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    done = _train(run_dir, 10)
    assert done.returncode == 0, done.stdout[-3000:]
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(trained), str(copy)], check=True)
    return copy


# -- the manifest is checksummed -----------------------------------------------------------------


def test_a_changed_digit_in_the_manifest_is_corruption_and_resume_falls_back(run_dir: Path) -> None:
    """Before: one digit of the cursor's offset changed, `ckpt verify` said OK and the resumed run
    silently skipped samples."""
    manifest = _snap(run_dir, 10) / layout.MANIFEST
    data = manifest.read_bytes()
    cursor = b'"offset":' + str(json.loads(data.partition(b"\n")[2])["objects"]["sampler"]["offset"]).encode()
    assert cursor in data
    manifest.write_bytes(data.replace(cursor, cursor[:-1] + b"9" if not cursor.endswith(b"9") else cursor[:-1] + b"8"))

    verify = run(dtrain_cmd("ckpt", "verify", str(run_dir)), timeout=120)
    assert verify.returncode == 1, verify.stdout
    assert f"BAD {_snap(run_dir, 10)}" in verify.stdout and "checksum mismatch" in verify.stdout
    assert f"OK  {_snap(run_dir, 5)}" in verify.stdout

    resumed = _train(run_dir, 12)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _resumed_from(resumed.stdout) == 5
    assert "manifest.json: checksum mismatch" in resumed.stdout


# -- special files: never hang, never read outside ----------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlinked-step-dir", "symlinked-shard"])
def test_special_files_make_a_snapshot_corrupt_never_hang_it(run_dir: Path, tmp_path: Path, kind: str) -> None:
    """Before: a FIFO manifest hung `train` forever; a symlink to /dev/zero read until out of memory;
    a symlinked step dir or shard made restore read outside the run dir."""
    snap = _snap(run_dir, 10)
    if kind == "fifo":
        (snap / layout.MANIFEST).unlink()
        os.mkfifo(snap / layout.MANIFEST)
    elif kind == "dev-zero":
        (snap / layout.MANIFEST).unlink()
        (snap / layout.MANIFEST).symlink_to("/dev/zero")
    elif kind == "symlinked-step-dir":
        outside = tmp_path / "outside"
        snap.rename(outside)
        snap.symlink_to(outside)
    else:
        shard = next(snap.glob("replicated-*.bin"))
        outside = tmp_path / "outside.bin"
        shard.rename(outside)
        shard.symlink_to(outside)

    verify = run(dtrain_cmd("ckpt", "verify", str(run_dir)), timeout=60)
    assert verify.returncode == 1, verify.stdout
    assert f"BAD {snap}" in verify.stdout and "not a regular file inside the run dir" in verify.stdout
    resumed = _train(run_dir, 12, timeout=90)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _resumed_from(resumed.stdout) == 5


# -- sizes are checked before anything is allocated ----------------------------------------------


def _claim_huge_tensor(snap: Path, nbytes: int) -> str:
    """Re-sign the manifest so one replicated file and its tensor claim `nbytes`; return the file's name."""
    raw = json.loads((snap / layout.MANIFEST).read_bytes().partition(b"\n")[2])
    key, entry = next((k, e) for k, e in raw["tensors"].items()
                      if e["view"] is None and len(e["pieces"]) == 1 and e["pieces"][0]["file"].startswith("replicated"))
    name = entry["pieces"][0]["file"]
    for other in raw["tensors"].values():  # the file now holds this tensor alone
        other["pieces"] = [p for p in other["pieces"] if p["file"] != name or other is entry]
    raw["tensors"] = {k: e for k, e in raw["tensors"].items() if e["pieces"] or e["view"] or k == key}
    entry["dtype"], entry["shape"] = "uint8", [nbytes]
    entry["pieces"] = [{"file": name, "file_offset": 0, "tensor_offset": 0, "nbytes": nbytes, "crc32c": 0}]
    raw["files"][name]["bytes"] = nbytes
    (snap / layout.MANIFEST).write_bytes(with_header(json.dumps(raw).encode()))
    return name


@pytest.mark.parametrize("sparse", [False, True], ids=["size-on-disk-differs", "sparse-file-over-memory"])
def test_a_huge_tensor_claim_is_refused_before_allocation_and_resume_falls_back(run_dir: Path, sparse: bool) -> None:
    """Before: restore called torch.empty for a 16 TiB tensor first; the allocator's RuntimeError
    was not corruption, so every restart crashed the same way instead of using the previous snapshot."""
    snap = _snap(run_dir, 10)
    nbytes = (8 if sparse else 16) << 40  # ext4 holds files of up to 16 TiB less a block
    name = _claim_huge_tensor(snap, nbytes)
    if sparse:  # the size on disk matches: only the memory check stands between restore and the allocator
        try:
            os.truncate(snap / name, nbytes)
        except OSError as e:
            pytest.skip(f"this file system cannot hold a sparse 16 TiB file ({e})")
    storage = LocalStorage(run_dir)
    with pytest.raises(SnapshotError) as info:
        reader.restore(storage, 10)
    assert ("bytes of new tensors" if sparse else "bytes on disk, the manifest records") in str(info.value)
    resumed = _train(run_dir, 12)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _resumed_from(resumed.stdout) == 5


# -- one deadline bounds a save --------------------------------------------------------------------


def _model_state() -> dict:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(256, 256).state_dict()}


class _StopsInTheChild(LocalStorage):
    """A disk on which the forked writer of step 2 stops (SIGSTOP) before it writes, as a stuck child would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.parent = os.getpid()

    def open_write(self, path: str):
        if os.getpid() != self.parent and "step_000000002" in path:
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().open_write(path)


def test_a_stopped_writer_process_fails_the_save_at_its_deadline_and_is_killed(tmp_path: Path) -> None:
    """Before: a stopped writer child made the next save() block forever on its report pipe."""
    storage = _StopsInTheChild(tmp_path)
    writer = SnapshotWriter(storage, solo_context(), staging="fork", timeout_seconds=3)
    writer.save(1, _model_state(), {}).wait()
    children_before = set(_children())
    pending = writer.save(2, _model_state(), {})
    [child] = set(_children()) - children_before
    assert pending.step == 2
    started = time.monotonic()
    with pytest.raises(SnapshotError, match="did not report within the save's deadline"):
        writer.wait()
    assert time.monotonic() - started < 10
    assert not Path(f"/proc/{child}").exists()  # killed and reaped, not left behind
    assert catalog.committed_steps(storage) == [1]
    assert storage.listdir(layout.PENDING) == []  # the partial save was removed
    writer.save(3, _model_state(), {}).wait()  # the next save goes through
    assert catalog.committed_steps(storage) == [1, 3]


class _StuckDisk(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.stuck = threading.Event()
        self.release = threading.Event()

    def open_write(self, path: str):
        if "step_000000002" in path and self.stuck.is_set():
            self.release.wait(60)
        return super().open_write(path)


def test_a_stuck_disk_fails_the_save_at_its_deadline_and_it_never_commits_later(tmp_path: Path) -> None:
    storage = _StuckDisk(tmp_path)
    writer = SnapshotWriter(storage, solo_context(), staging="copy", timeout_seconds=2)
    writer.save(1, _model_state(), {}).wait()
    storage.stuck.set()
    pending = writer.save(2, _model_state(), {})
    with pytest.raises(SnapshotError, match="step 2 did not finish within snapshot.timeout_seconds"):
        writer_wait_bounded(pending, grace=0)
    storage.release.set()  # the disk comes back after the save was given up
    wait_for(pending.done, 30, "the abandoned save's thread to end")
    assert catalog.committed_steps(storage) == [1]


def writer_wait_bounded(pending, grace: float) -> None:
    """`pending.wait()` with the commit grace shortened, as the other ranks' wait is bounded too."""
    import dtrain.snapshot.writer as w

    saved, w.COMMIT_GRACE_SECONDS = w.COMMIT_GRACE_SECONDS, grace
    try:
        pending.wait()
    finally:
        w.COMMIT_GRACE_SECONDS = saved


def _children() -> list[int]:
    from support.procs import children

    return children(os.getpid())


# -- past the commit point, a failure only warns ---------------------------------------------------


class _LatestFails(LocalStorage):
    def write_atomic(self, path: str, data: bytes) -> None:
        if path == layout.LATEST:
            raise OSError(5, "Input/output error (injected)", path)
        super().write_atomic(path, data)


def test_an_error_after_the_commit_point_reports_the_snapshot_committed(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Before: a failed `latest` update after the rename was reported as "not committed"
    although step_N was committed (and then counted as a failed save)."""
    storage = _LatestFails(tmp_path)
    result = SnapshotWriter(storage, solo_context()).save(4, _model_state(), {}).wait()
    assert result.path == layout.committed_path(4)
    assert catalog.committed_steps(storage) == [4] and reader.verify(storage, 4) == []
    assert "is committed, but updating snapshots/latest failed" in caplog.text


# -- config changes on resume --------------------------------------------------------------------


def test_a_resume_with_another_seed_is_refused_naming_the_key_unless_allowed(run_dir: Path) -> None:
    """Before: `--set train.seed=1` on resume was accepted and epoch 0 repeated and skipped samples."""
    before = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    refused = _train(run_dir, 12, "--set", "train.seed=1", "--set", "task.options.lr=0.5")
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "train.seed: 0 -> 1" in refused.stdout and "task.options.lr: None -> 0.5" in refused.stdout
    assert "--allow-config-change" in refused.stdout
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == before  # nothing written

    applied = _train(run_dir, 12, "--set", "snapshot.keep_last=4")
    assert applied.returncode == 0, applied.stdout[-3000:]
    assert "config change applied on resume: train.steps: 10 -> 12" in applied.stdout
    assert "snapshot.keep_last: 5 -> 4" in applied.stdout

    allowed = _train(run_dir, 14, "--set", "train.seed=1", "--allow-config-change")
    assert allowed.returncode == 0, allowed.stdout[-3000:]
    assert "config change accepted by --allow-config-change: train.seed: 0 -> 1" in allowed.stdout


# -- one job per run dir -------------------------------------------------------------------------


def test_a_second_job_on_a_run_dir_in_use_exits_2_naming_the_holder(tmp_path: Path) -> None:
    """Before: a second job deleted the first one's in-flight saves and moved its snapshots aside."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(dtrain_cmd("train", "--run-dir", str(run_dir), *SMALL, "--set", "train.steps=100000"),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: catalog.committed_steps(LocalStorage(run_dir)) if (run_dir / "snapshots").is_dir() else [],
                 120, "the first job's first commit")
        for check in ([], ["--check"]):
            second = run(dtrain_cmd("train", *check, "--run-dir", str(run_dir), *SMALL), timeout=120)
            assert second.returncode == 2, second.stdout[-3000:]
            assert f"pid {first.pid}" in second.stdout and "another dtrain job holds" in second.stdout
        assert first.poll() is None  # the first job trains on, untouched
    finally:
        first.kill()
        first.wait()
    again = _train(run_dir, 1)  # the lock died with its holder
    assert again.returncode == 0, again.stdout[-3000:]
