"""The run dir lock, between real processes: one holder at a time, gone when the holder dies,
and never kept by a forked child."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dtrain.errors import ConfigError
from dtrain.runlock import LOCK_NAME, RunDirLock, RunDirLockedError, probe
from tests.conftest import REPO

_ACQUIRE = """
import sys
from pathlib import Path
from dtrain.runlock import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
print("acquired", flush=True)
if len(sys.argv) > 2:
    import time
    time.sleep(float(sys.argv[2]))
"""


_FORK_AND_HOLD = """
import os, sys, time
from pathlib import Path
from dtrain.runlock import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def _acquire_elsewhere(run_dir: Path) -> subprocess.CompletedProcess:
    """Try the lock from another process, which exits at once either way (LOCK_NB never waits)."""
    return subprocess.run([sys.executable, "-c", _ACQUIRE, str(run_dir)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _ACQUIRE, str(run_dir), "600"], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline() == "acquired\n"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # not read to its end: a forked child of `proc` may hold it open


@pytest.mark.timeout(120)
def test_a_second_job_fails_at_once_naming_the_holder_until_it_releases(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path)
    lock.acquire()
    refused = _acquire_elsewhere(tmp_path)
    assert refused.returncode != 0
    assert "RunDirLockedError" in refused.stderr
    assert f"another dtrain job holds {tmp_path} (host {socket.gethostname()}, pid {os.getpid()}, since " in refused.stderr
    assert "stop it, or use another --run-dir" in refused.stderr
    lock.release()
    done = _acquire_elsewhere(tmp_path)
    assert done.returncode == 0, done.stderr


def test_the_lock_file_names_its_holder(tmp_path: Path) -> None:
    before = time.time()
    with RunDirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert before <= holder["since_unix"] <= time.time()
    assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.timeout(120)
def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid},"):
            RunDirLock(tmp_path).acquire()
    finally:
        _kill(proc)
    with RunDirLock(tmp_path) as lock:
        assert lock.is_held


@pytest.mark.timeout(120)
def test_probe_raises_while_held_and_touches_nothing_when_free(tmp_path: Path) -> None:
    probe(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    probe(tmp_path / "missing")
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid},"):
            probe(tmp_path)
    finally:
        _kill(proc)
    before = (tmp_path / LOCK_NAME).read_bytes(), (tmp_path / LOCK_NAME).stat().st_mtime_ns
    probe(tmp_path)
    assert before == ((tmp_path / LOCK_NAME).read_bytes(), (tmp_path / LOCK_NAME).stat().st_mtime_ns)
    with RunDirLock(tmp_path) as lock:  # and the probe left it free
        assert lock.is_held


@pytest.mark.timeout(120)
def test_a_forked_child_does_not_keep_the_lock_after_the_parent_releases(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path)
    lock.acquire()
    pid = os.fork()
    if pid == 0:  # the child: outlive the parent's release, then leave without running pytest's exit
        try:
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        lock.release()
        done = _acquire_elsewhere(tmp_path)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child should still be alive"
        assert done.returncode == 0, done.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.timeout(120)
def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _FORK_AND_HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    child = int(parent.stdout.readline())
    try:
        _kill(parent)
        done = _acquire_elsewhere(tmp_path)
        os.kill(child, 0)  # the child is still alive, and yet the lock is free
        assert done.returncode == 0, done.stderr
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_released_lock_can_be_taken_again_and_release_is_idempotent(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path)
    lock.acquire()
    with pytest.raises(RunDirLockedError):
        RunDirLock(tmp_path).acquire()  # another open of the file conflicts, even in this process
    lock.release()
    lock.release()
    lock.acquire()
    lock.release()


@pytest.mark.parametrize("make", [
    lambda p: p.symlink_to(p.parent / "elsewhere"),
    lambda p: p.mkdir(),
    lambda p: os.mkfifo(p),
])
def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, make: Callable[[Path], None]) -> None:
    make(tmp_path / LOCK_NAME)
    with pytest.raises(ConfigError, match=rf"{LOCK_NAME}: not a regular file"):
        RunDirLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=rf"{LOCK_NAME}: not a regular file"):
        probe(tmp_path)
    assert not (tmp_path / "elsewhere").exists()
