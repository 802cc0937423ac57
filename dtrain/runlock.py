"""An exclusive lock on a run dir, so that two jobs never train into the same one.

A second job started on a run dir that a first one is still using would delete the first one's
in-flight saves (start-up cleanup of `.pending/`) and move its snapshots aside. So rank 0 holds
`flock(LOCK_EX)` on `RUN_DIR/.lock` for the whole run, and a second job fails at once with an error
naming the holder, read from the one line of JSON the holder wrote there:

    with RunDirLock(run_dir):
        trainer.fit()

The kernel drops the lock when the holder exits, however it dies (SIGKILL, OOM), so a crashed job
never leaves a stale lock behind, and `.lock` itself is never deleted (deleting it would let two
jobs lock two different files of that name). On NFS, Linux emulates `flock` with POSIX locks that
the server sees; Lustre needs the `flock` mount option for the lock to hold across nodes.

A forked child shares its parent's open file description, and with it the lock: a writer child
that outlived the trainer would keep the run dir locked. So every lock held in this process is
closed, not unlocked, in each forked child (unlocking would release the parent's lock too).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from types import TracebackType

from dtrain.errors import ConfigError

LOCK_NAME = ".lock"

_held: set[RunDirLock] = set()
"""Every lock this process holds, so that a forked child can close its copies. A strong set:
a held lock stays alive (and its descriptor known) until released, even if its owner drops it."""


class RunDirLockedError(ConfigError):
    """Another dtrain job holds the run dir's lock."""


class RunDirLock:
    """The exclusive lock on one run dir; `acquire` raises `RunDirLockedError` if another holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd = -1

    @property
    def is_held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        if self.is_held:
            raise RuntimeError(f"{self.run_dir}: this RunDirLock is already held")
        fd = _open_lock_file(self.run_dir, os.O_CREAT | os.O_RDONLY)
        try:
            fd = _lock_or_raise(fd, self.run_dir)
            _write_holder(self.run_dir)
        except BaseException:
            os.close(fd)  # also drops the lock if it was taken
            raise
        self._fd = fd
        _held.add(self)

    def release(self) -> None:
        if not self.is_held:
            return
        fd, self._fd = self._fd, -1
        _held.discard(self)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def probe(run_dir: Path) -> None:
    """Raise `RunDirLockedError` if a process holds the run dir's lock; touch nothing otherwise
    (for `dtrain train --check`). The lock is taken and dropped at once when it is free."""
    try:
        fd = _open_lock_file(Path(run_dir), os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fd = _lock_or_raise(fd, Path(run_dir))
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(run_dir: Path, flags: int) -> int:
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a symlink, a socket, a directory
            raise _not_a_lock_file(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock_file(path)
    return fd


def _not_a_lock_file(path: Path) -> ConfigError:
    return ConfigError(f"{path}: not a regular file, where dtrain keeps its run dir lock; remove it and start again")


def _lock_or_raise(fd: int, run_dir: Path) -> int:
    """Lock `fd`, or raise naming the holder; returns the descriptor that holds the lock.

    The lock is held through a read-only descriptor where the file system allows it, so that a
    running job never keeps a file open for writing (a read-only remount of the disk still
    succeeds, and a failing disk can be taken away). NFS grants an exclusive lock only on a
    writable descriptor (EBADF otherwise): there it is reopened read-write.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        raise RunDirLockedError(f"another dtrain job holds {run_dir} ({_describe_holder(fd)}); "
                                "stop it, or use another --run-dir") from None
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
    os.close(fd)
    return _lock_or_raise(_open_lock_file(run_dir, os.O_RDWR), run_dir)


def _write_holder(run_dir: Path) -> None:
    """Name the holder in the lock file, through a descriptor closed at once."""
    line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since_unix": time.time()}) + "\n"
    fd = _open_lock_file(run_dir, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_holder(fd: int) -> str:
    """'host H, pid P, since T' from the holder's line, or why it cannot be said."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["since_unix"])))
        return f"host {holder['host']}, pid {holder['pid']}, since {since}"
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return f"holder unknown: {LOCK_NAME} is being written or is unreadable"


def _close_in_child() -> None:
    """In a forked child: close the inherited descriptors, so that the lock dies with the parent."""
    for lock in _held:
        fd, lock._fd = lock._fd, -1
        try:
            os.close(fd)  # never LOCK_UN: the parent shares this lock and still holds it
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
