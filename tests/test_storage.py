"""LocalStorage: reads only regular files inside the run dir, never follows a symlink below it,
closes each descriptor once, and makes what it creates durable."""

from __future__ import annotations

import collections
import errno
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from dtrain.storage import CommitConflictError, LocalStorage, local
from dtrain.storage.local import UnsafePathError

STEP = "snapshots/step_000000400"
MANIFEST = f"{STEP}/manifest.json"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "run" / STEP).mkdir(parents=True)
    return tmp_path / "run"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the run dir, holding a regular file and a step dir of its own."""
    (tmp_path / "outside" / "step_000000400").mkdir(parents=True)
    (tmp_path / "outside" / "secret").write_bytes(b"not yours")
    (tmp_path / "outside" / "step_000000400" / "manifest.json").write_bytes(b"{}")
    return tmp_path / "outside"


def _fifo(root: Path, outside: Path) -> None:
    os.mkfifo(root / MANIFEST)


def _socket(root: Path, outside: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(root / STEP)  # a socket's path must be short; the relative one is
    try:
        s.bind("manifest.json")
    finally:
        os.chdir(cwd)
        s.close()


def _directory(root: Path, outside: Path) -> None:
    (root / MANIFEST).mkdir()


def _link_to_dev_zero(root: Path, outside: Path) -> None:
    (root / MANIFEST).symlink_to("/dev/zero")


def _link_to_outside_file(root: Path, outside: Path) -> None:
    (root / MANIFEST).symlink_to(outside / "secret")


def _link_to_inside_file(root: Path, outside: Path) -> None:
    (root / "snapshots" / "elsewhere").write_bytes(b"{}")
    (root / MANIFEST).symlink_to("../elsewhere")


def _linked_step_dir(root: Path, outside: Path) -> None:
    (root / STEP).rmdir()
    (root / STEP).symlink_to(outside / "step_000000400")


def _linked_snapshots_dir(root: Path, outside: Path) -> None:
    (root / STEP).rmdir()
    (root / "snapshots").rmdir()
    (root / "snapshots").symlink_to(outside, target_is_directory=True)
    (outside / "step_000000400" / "manifest.json").write_bytes(b"{}")


HOSTILE = [_fifo, _socket, _directory, _link_to_dev_zero, _link_to_outside_file, _link_to_inside_file,
           _linked_step_dir, _linked_snapshots_dir]


def _read_bytes(s: LocalStorage) -> object:
    return s.read_bytes(MANIFEST, 1 << 40)


def _read_into(s: LocalStorage) -> object:
    return s.read_into(MANIFEST, [memoryview(bytearray(2))])


def _size(s: LocalStorage) -> object:
    return s.size(MANIFEST)


@pytest.mark.timeout(20)  # a FIFO opened without O_NONBLOCK, or /dev/zero read to the end, never returns
@pytest.mark.parametrize("plant", HOSTILE, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("read", [_read_bytes, _read_into, _size], ids=lambda f: f.__name__.strip("_"))
def test_a_hostile_entry_is_refused_at_once_naming_the_path(root: Path, outside: Path, plant: Callable,
                                                            read: Callable) -> None:
    plant(root, outside)
    storage = LocalStorage(root)
    with pytest.raises(UnsafePathError, match=r"manifest\.json: not a regular file inside the run dir"):
        read(storage)
    assert not storage.is_regular_file(MANIFEST)


@pytest.mark.parametrize("path", ["../outside/secret", "/etc/hostname", f"{STEP}/../../../outside/secret"])
def test_a_path_climbing_out_of_the_root_is_refused(root: Path, outside: Path, path: str) -> None:
    with pytest.raises(UnsafePathError, match="not inside the run dir"):
        LocalStorage(root).read_bytes(path, 1 << 20)


def test_the_root_itself_may_be_a_symlink(root: Path, tmp_path: Path) -> None:
    (root / MANIFEST).write_bytes(b"{}")
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    storage = LocalStorage(tmp_path / "alias")
    assert storage.read_bytes(MANIFEST, 100) == b"{}"
    assert storage.size(MANIFEST) == 2
    assert storage.is_regular_file(MANIFEST)
    assert storage.listdir(STEP) == ["manifest.json"]


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"x"), True),
    (lambda p: None, False),
    (lambda p: p.mkdir(), False),
    (lambda p: os.mkfifo(p), False),
    (lambda p: p.symlink_to(p.parent / "real"), False),
    (lambda p: p.symlink_to(p.parent / "nowhere"), False),
])
def test_is_regular_file(root: Path, make: Callable[[Path], None], expected: bool) -> None:
    (root / STEP / "real").write_bytes(b"x")
    make(root / MANIFEST)
    assert LocalStorage(root).is_regular_file(MANIFEST) is expected


def test_exists_counts_any_entry_even_a_dangling_symlink(root: Path) -> None:
    (root / MANIFEST).symlink_to(root / "nowhere")
    storage = LocalStorage(root)
    assert storage.exists(MANIFEST)
    assert storage.exists(STEP)
    assert not storage.exists(f"{STEP}/missing")


def _lie_about_size(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Make every stat say `size` bytes, as a file that grows, or lies, would."""
    def lying(real: Callable) -> Callable:
        def stat(*args: object, **kw: object) -> os.stat_result:
            fields = list(real(*args, **kw))[:10]
            fields[6] = size
            return os.stat_result(fields)
        return stat
    monkeypatch.setattr(os, "stat", lying(os.stat))
    monkeypatch.setattr(os, "fstat", lying(os.fstat))


def test_read_bytes_never_reads_more_than_limit_plus_one(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / MANIFEST).write_bytes(b"x" * 5000)
    _lie_about_size(monkeypatch, 10)
    real_read, read = os.read, []
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(real_read(fd, n)) or read[-1])
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        LocalStorage(root).read_bytes(MANIFEST, 100)
    assert sum(len(chunk) for chunk in read) <= 101


@pytest.mark.parametrize("size, limit", [(0, 0), (100, 100), (3 << 20, 3 << 20)])
def test_read_bytes_returns_a_file_up_to_its_limit(root: Path, size: int, limit: int) -> None:
    data = os.urandom(size)
    (root / MANIFEST).write_bytes(data)
    assert LocalStorage(root).read_bytes(MANIFEST, limit) == data


def test_read_bytes_refuses_a_file_over_its_limit(root: Path) -> None:
    (root / MANIFEST).write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match=r"manifest\.json is over the 100-byte limit"):
        LocalStorage(root).read_bytes(MANIFEST, 100)


def test_read_into_fills_outs_in_turn_and_reports_each(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10)
    (root / MANIFEST).write_bytes(data)
    advised, real_fadvise = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: advised.append(a) or real_fadvise(fd, o, n, a))
    outs, seen = [bytearray(4), bytearray(6)], []
    LocalStorage(root).read_into(MANIFEST, [memoryview(o) for o in outs], lambda m: seen.append(bytes(m)))
    assert outs == [bytearray(data[:4]), bytearray(data[4:])]
    assert seen == [data[:4], data[4:]]
    assert advised == [os.POSIX_FADV_SEQUENTIAL]


def test_read_into_checks_the_size_of_the_file_it_opened(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / MANIFEST).write_bytes(b"x" * 6)
    looked_up, real_stat = [], os.stat
    def stat(path: object, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> os.stat_result:
        if dir_fd is None:
            looked_up.append(path)
        return real_stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    monkeypatch.setattr(os, "stat", stat)
    seen = []
    with pytest.raises(EOFError, match=r"manifest\.json is 6 bytes, expected at least 8"):
        LocalStorage(root).read_into(MANIFEST, [memoryview(bytearray(4))] * 2, seen.append)
    monkeypatch.undo()
    assert seen == []  # refused before any byte was handed on
    assert [p for p in looked_up if str(p).startswith(str(root))] == []  # no lookup by path beside the open


def test_size_is_of_the_regular_file_itself(root: Path) -> None:
    (root / MANIFEST).write_bytes(b"x" * 7)
    assert LocalStorage(root).size(MANIFEST) == 7
    with pytest.raises(FileNotFoundError):
        LocalStorage(root).size(f"{STEP}/missing")


def _count_closes(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    closed, real_close = collections.Counter(), os.close
    monkeypatch.setattr(os, "close", lambda fd: closed.update([fd]) or real_close(fd))
    return closed


def _failing_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_close_then_abort_closes_the_descriptor_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = LocalStorage(root).open_write(f"{STEP}/rank-00000.bin")
    fd = handle._fd
    handle.write(memoryview(b"bytes"))
    closed = _count_closes(monkeypatch)
    _failing_fsync(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        handle.close()
    handle.abort()
    handle.abort()
    assert closed[fd] == 1
    with pytest.raises(OSError, match="not known to be stored"):  # never vouches for what failed
        handle.close()


def test_close_and_abort_after_a_good_close_do_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = LocalStorage(root).open_write(f"{STEP}/rank-00000.bin")
    fd = handle._fd
    closed = _count_closes(monkeypatch)
    handle.close()
    handle.close()
    handle.abort()
    assert closed[fd] == 1


def test_write_atomic_with_a_failed_fsync_closes_each_descriptor_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = _count_closes(monkeypatch)
    _failing_fsync(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        LocalStorage(root).write_atomic(MANIFEST, b"{}")
    assert closed and max(closed.values()) == 1
    assert os.listdir(root / STEP) == []  # the temp file is gone too


def test_write_atomic_never_writes_through_a_planted_temp_name(root: Path, outside: Path) -> None:
    (root / "snapshots" / f".latest.tmp-{os.getpid()}").symlink_to(outside / "secret")
    LocalStorage(root).write_atomic("snapshots/latest", b"step_000000400\n")
    assert (outside / "secret").read_bytes() == b"not yours"
    assert not (root / "snapshots" / "latest").is_symlink()
    assert (root / "snapshots" / "latest").read_bytes() == b"step_000000400\n"


def test_a_stale_temp_file_of_a_reused_pid_does_not_block_write_atomic(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **kw: opened.append((str(p), flags)) or real_open(p, flags, *a, **kw))
    (root / "snapshots" / f".latest.tmp-{os.getpid()}").write_bytes(b"stale")
    LocalStorage(root).write_atomic("snapshots/latest", b"new")
    assert (root / "snapshots" / "latest").read_bytes() == b"new"
    [(tmp, flags)] = [(p, f) for p, f in opened if ".tmp-" in p]
    assert re.fullmatch(rf"\.latest\.tmp-{os.getpid()}-[0-9a-f]+", Path(tmp).name)
    wanted = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    assert flags & wanted == wanted and not flags & os.O_TRUNC


@pytest.mark.parametrize("name, is_temp", [
    (".latest.tmp-123", True),
    (".latest.tmp-123-9f3a0c", True),
    (".manifest.json.tmp-7-00ff", True),
    ("latest", False),
    (".latest.tmp-", False),
    (".latest.tmp-12x", False),
    (".latest.tmp-12-XYZ", False),
    ("latest.tmp-123", False),
])
def test_temp_name(name: str, is_temp: bool) -> None:
    assert bool(local._TEMP_NAME.match(name)) is is_temp


def test_remove_temp_files_removes_files_and_links_never_targets(root: Path, outside: Path) -> None:
    snaps = root / "snapshots"
    (snaps / ".latest.tmp-1").write_bytes(b"old")
    (snaps / ".latest.tmp-2-ab").write_bytes(b"new")
    (snaps / ".latest.tmp-3").symlink_to(snaps / "gone")  # dangling
    (snaps / ".latest.tmp-4").symlink_to(outside / "secret")
    (snaps / ".latest.tmp-5").symlink_to(outside, target_is_directory=True)
    (snaps / ".latest.tmp-6").mkdir()
    (snaps / "latest").write_bytes(b"keep")
    removed = LocalStorage(root).remove_temp_files("snapshots")
    assert removed == [".latest.tmp-1", ".latest.tmp-2-ab", ".latest.tmp-3", ".latest.tmp-4", ".latest.tmp-5"]
    assert sorted(os.listdir(snaps)) == [".latest.tmp-6", "latest", "step_000000400"]
    assert (outside / "secret").read_bytes() == b"not yours"
    assert sorted(os.listdir(outside)) == ["secret", "step_000000400"]


def test_remove_temp_files_does_not_follow_a_symlinked_directory(root: Path, outside: Path) -> None:
    (outside / ".latest.tmp-1").write_bytes(b"theirs")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert LocalStorage(root).remove_temp_files("linked") == []
    assert (outside / ".latest.tmp-1").exists()


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    synced, real_fsync = [], os.fsync
    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_makedirs_makes_each_new_directory_durable_in_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    synced = _record_fsyncs(monkeypatch)
    LocalStorage(run).makedirs("snapshots/.pending/step_000000400.ab")
    assert synced == [run, run / "snapshots", run / "snapshots" / ".pending"]
    assert (run / "snapshots" / ".pending" / "step_000000400.ab").is_dir()
    synced.clear()
    LocalStorage(run).makedirs("snapshots/.pending/step_000000400.ab")
    LocalStorage(run).makedirs("snapshots/.pending/other")
    assert synced == [run / "snapshots" / ".pending"]


def test_makedirs_creates_a_missing_root_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    LocalStorage(tmp_path / "a" / "run").makedirs("snapshots")
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "run"]
    assert (tmp_path / "a" / "run" / "snapshots").is_dir()


def test_makedirs_refuses_a_symlink_below_the_root(root: Path, outside: Path) -> None:
    (root / "snapshots" / ".pending").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match=r"\.pending/step_1: not a directory inside the run dir"):
        LocalStorage(root).makedirs("snapshots/.pending/step_1")
    assert sorted(os.listdir(outside)) == ["secret", "step_000000400"]


def test_listdir_lists_only_real_directories(root: Path, outside: Path) -> None:
    (root / STEP / "b").write_bytes(b"")
    (root / STEP / "a").write_bytes(b"")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(root)
    assert storage.listdir(STEP) == ["a", "b"]
    assert storage.listdir("linked") == []
    assert storage.listdir("linked/step_000000400") == []
    assert storage.listdir(f"{STEP}/a") == []
    assert storage.listdir("missing") == []


def test_remove_tree_deletes_a_directory(root: Path) -> None:
    (root / STEP / "manifest.json").write_bytes(b"{}")
    LocalStorage(root).remove_tree(STEP)
    assert os.listdir(root / "snapshots") == []
    LocalStorage(root).remove_tree(STEP)  # errors, such as a missing path, are ignored


def test_remove_tree_of_a_symlink_unlinks_the_link_not_the_target(root: Path, outside: Path) -> None:
    (root / "snapshots" / ".pending").mkdir()
    (root / "snapshots" / ".pending" / "step_1").symlink_to(outside, target_is_directory=True)
    LocalStorage(root).remove_tree("snapshots/.pending/step_1")
    assert os.listdir(root / "snapshots" / ".pending") == []
    assert sorted(os.listdir(outside)) == ["secret", "step_000000400"]


def test_remove_tree_below_a_symlinked_directory_touches_nothing(root: Path, outside: Path) -> None:
    (root / "snapshots" / ".pending").symlink_to(outside, target_is_directory=True)
    LocalStorage(root).remove_tree("snapshots/.pending/step_000000400")
    assert (outside / "step_000000400" / "manifest.json").exists()


def test_what_is_written_reads_back(root: Path) -> None:
    storage = LocalStorage(root)
    storage.write_atomic(MANIFEST, b'{"step": 400}')
    handle = storage.open_write(f"{STEP}/rank-00000.bin")
    handle.write(memoryview(b"abcdef"))
    handle.close()
    out = bytearray(6)
    storage.read_into(f"{STEP}/rank-00000.bin", [memoryview(out)])
    assert out == b"abcdef"
    assert storage.read_bytes(MANIFEST, 100) == b'{"step": 400}'
    assert storage.listdir(STEP) == ["manifest.json", "rank-00000.bin"]


def test_commit_renames_the_pending_dir_and_never_replaces_a_committed_snapshot(root: Path) -> None:
    storage = LocalStorage(root)
    for name, manifest in (("first", b"first writer"), ("second", b"second writer")):
        pending = f"snapshots/.pending/step_000000500.{name}"
        assert storage.save_dir(pending, "snapshots/step_000000500") == pending
        storage.makedirs(pending)
        handle = storage.open_write(f"{pending}/rank-00000.bin")
        handle.write(memoryview(name.encode()))
        handle.close()
        if name == "first":
            storage.commit(pending, "snapshots/step_000000500", "manifest.json", manifest)
        else:
            with pytest.raises(CommitConflictError, match="committed already"):
                storage.commit(pending, "snapshots/step_000000500", "manifest.json", manifest)
    assert storage.read_bytes("snapshots/step_000000500/manifest.json", 100) == b"first writer"
    assert storage.read_bytes("snapshots/step_000000500/rank-00000.bin", 100) == b"first"


def test_uncommit_moves_the_snapshot_aside_in_one_rename(root: Path) -> None:
    storage = LocalStorage(root)
    (root / MANIFEST).write_bytes(b"{}")
    remains = storage.uncommit(STEP, "snapshots/.pending/deleting-step_000000400.ab", "manifest.json")
    assert remains == "snapshots/.pending/deleting-step_000000400.ab"
    assert not (root / STEP).exists() and (root / remains / "manifest.json").is_file()
