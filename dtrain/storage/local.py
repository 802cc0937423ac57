"""A POSIX filesystem, local or shared (NFS, Lustre), under one root directory.

Regular files inside the root, never follow: every read reaches its file one component at a time
from the root, opening each directory with `O_NOFOLLOW | O_DIRECTORY` relative to the one before
(`dir_fd`), and refuses, with `UnsafePathError`, any path where a component below the root is a
symlink or where the file itself is not a regular file. A run dir may be hostile or damaged (a copy
from someone else, a shared scratch area), and following it would let it hang a reader (a FIFO in
place of `manifest.json` blocks `open` forever), exhaust memory (a symlink to `/dev/zero` reports
size 0 and never ends) or make a restore read files outside the run dir (a symlinked step dir).
The final file is opened `O_NONBLOCK`, so that even a FIFO swapped in after the check cannot block,
and checked again with `fstat` on the open descriptor, so that the check and the read are of one
file. The root itself may be a symlink (run dirs often point at a mount); only what lies below it
is checked. Directories are created the same way, so that a symlink planted below the root fails
the run at its start rather than at its restore.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dtrain.storage.base import CommitConflictError

logger = logging.getLogger(__name__)

_WRITE_BLOCK = 8 << 20  # large writes, but bounded, so a slow disk still reports progress per block
_READ_BLOCK = 1 << 20  # `read_bytes` reads in blocks: one `os.read(fd, limit)` would allocate `limit` up front
# What `write_atomic` writes before its rename: `.{name}.tmp-{pid}-{hex}`, or `.{name}.tmp-{pid}` of older versions.
_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+(-[0-9a-f]+)?$")

_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What `open` says when it meets a symlink (ELOOP), a non-directory where a directory should be
# (ENOTDIR, also a symlink opened with O_DIRECTORY | O_NOFOLLOW), or a socket (ENXIO).
_UNSAFE_ERRNOS = {errno.ELOOP, errno.ENOTDIR, errno.ENXIO}


class UnsafePathError(OSError):
    """A path that does not lead, without following a symlink, to a regular file (for reads) or a
    directory (for `makedirs`) inside the run dir."""


class LocalWriteHandle:
    """A file open for writing; `close` and `abort` each close the descriptor at most once, so a
    failed `close` followed by the caller's `abort` never closes a number another thread reuses.

    Page-aligned runs of bytes (copy staging's buffers are page-aligned) go to the disk directly
    (`O_DIRECT`, through a second descriptor), the rest through the page cache. A direct write
    skips the kernel's copy into the page cache, which is most of a writer's CPU time, and leaves
    the trainer's own pages cached. Where the filesystem refuses `O_DIRECT` (tmpfs), every byte
    goes through the page cache. `close` fsyncs either way.
    """

    def __init__(self, path: Path, flags: int = _NEW_FILE_FLAGS) -> None:
        self._path = path
        self._fd = os.open(path, flags, 0o644)
        self._direct_fd: int | None = None
        self._direct = _DIRECT is not None
        self._offset = 0
        self._is_durable = False

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        for start in range(0, len(data), _WRITE_BLOCK):
            block = data[start:start + _WRITE_BLOCK]
            aligned = _aligned_length(block, self._offset) if self._direct else 0
            if aligned and self._write_direct(block[:aligned]):
                block = block[aligned:]
            self._write_cached(block)

    def _write_cached(self, block: memoryview) -> None:
        while block:
            written = os.pwrite(self._fd, block, self._offset)
            block, self._offset = block[written:], self._offset + written

    def _write_direct(self, block: memoryview) -> bool:
        """Write `block` around the page cache; False (and direct writes off) where the filesystem refuses."""
        try:
            if self._direct_fd is None:
                self._direct_fd = os.open(self._path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | _DIRECT)
            while block:
                written = os.pwrite(self._direct_fd, block, self._offset)
                block, self._offset = block[written:], self._offset + written
        except OSError as e:
            if e.errno != errno.EINVAL or self._offset % _PAGE:
                raise
            self._direct = False
            return False
        return True

    def close(self) -> None:
        if self._fd < 0:
            if not self._is_durable:  # a second `close` must not vouch for bytes the first could not store
                raise OSError(f"{self._path}: closed after a failure; its bytes are not known to be stored")
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            self._close_direct()
        self._is_durable = True

    def abort(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError:
            pass
        self._close_direct()

    def _close_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


_DIRECT = getattr(os, "O_DIRECT", None)
_PAGE = 4096  # O_DIRECT's alignment on every Linux block device: address, length and file offset


def _aligned_length(block: memoryview, offset: int) -> int:
    """How many leading bytes of `block` can be written directly at file `offset` (0 if none)."""
    if offset % _PAGE or len(block) < _PAGE:
        return 0
    address = ctypes.addressof(ctypes.c_char.from_buffer(block)) if not block.readonly else None
    if address is None or address % _PAGE:
        return 0
    return len(block) // _PAGE * _PAGE


class LocalStorage:
    """Storage rooted at `root`; every path argument is relative to it (`/`-separated, no `..`).

        storage = LocalStorage("/mnt/runs/exp1")
        storage.makedirs("snapshots")
        storage.write_atomic("snapshots/latest", b"step_000000400\\n")
        storage.read_bytes("snapshots/latest", limit=1024)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def describe(self, path: str = "") -> str:
        return str(self.path(path)) if path else str(self.root)

    # -- writing -----------------------------------------------------------------------------

    def open_write(self, path: str) -> LocalWriteHandle:
        return LocalWriteHandle(self.path(path))

    def write_atomic(self, path: str, data: bytes) -> None:
        final = self.path(path)
        # A fresh name, created exclusively and never through a symlink: a stale temp file of a
        # reused pid cannot block it, and a planted one cannot redirect or truncate another file.
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")  # matches _TEMP_NAME
        handle = LocalWriteHandle(tmp, _TEMP_FILE_FLAGS)
        try:
            handle.write(memoryview(data))
            handle.close()
        except BaseException:
            handle.abort()
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        self.sync_dir(str(Path(path).parent))

    def remove_temp_files(self, path: str) -> list[str]:
        """Names removed from directory `path`: temp files of `write_atomic`, and symlinks so named
        (the link itself, never its target). Nothing is followed; other kinds of entry are left alone."""
        try:
            dir_fd = self._open_dir(path, _parts(path))
        except (FileNotFoundError, UnsafePathError):
            return []
        try:
            return [name for name in sorted(os.listdir(dir_fd))
                    if _TEMP_NAME.match(name) and _unlink_file_or_link(name, dir_fd)]
        finally:
            os.close(dir_fd)

    def makedirs(self, path: str) -> None:
        """Create directory `path` and its missing parents. Each directory created is made durable
        in its parent (fsync) at once; a symlink below the root raises `UnsafePathError`."""
        if not self.root.is_dir():
            _make_root(self.root)
        dir_fd = self._open_dir(path, [])
        try:
            for part in _parts(path):
                try:
                    os.mkdir(part, 0o777, dir_fd=dir_fd)
                    os.fsync(dir_fd)  # so that a power cut cannot lose the new entry
                except FileExistsError:
                    pass
                with _refusing(self.path(path), "a directory"):
                    dir_fd, parent = os.open(part, _DIR_FLAGS, dir_fd=dir_fd), dir_fd
                os.close(parent)
        finally:
            os.close(dir_fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.path(src), self.path(dst))

    # -- the commit primitive: a directory rename --------------------------------------------

    def save_dir(self, pending: str, final: str) -> str:
        return pending  # written aside, made visible by one rename

    def commit(self, save_dir: str, final: str, manifest_name: str, manifest: bytes) -> None:
        """Write the manifest into `save_dir` (fsynced, with the dir), then rename the dir to
        `final`: the commit point. The rename never replaces a committed snapshot (one with a
        manifest), nor any non-empty directory. A failed fsync of the parent after the rename only
        warns: the snapshot is committed."""
        if self.exists(f"{final}/{manifest_name}"):
            raise CommitConflictError(f"{self.path(final)} is committed already; this save was not")
        self.write_atomic(f"{save_dir}/{manifest_name}", manifest)
        try:
            os.rename(self.path(save_dir), self.path(final))
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise CommitConflictError(f"{self.path(final)} appeared while committing ({e.strerror})") from None
        try:
            self.sync_dir(str(Path(final).parent))
        except OSError as e:
            logger.warning("%s is committed, but making its rename durable failed (%s); a power cut may undo it",
                           self.path(final), e)

    def uncommit(self, final: str, aside: str, manifest_name: str) -> str:
        """One rename out of sight (into `aside`), made durable; the files are deleted later."""
        self.makedirs(str(Path(aside).parent))
        self.rename(final, aside)
        self.sync_dir(str(Path(final).parent))
        return aside

    def sync_dir(self, path: str) -> None:
        fd = os.open(self.path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_tree(self, path: str) -> None:
        """Delete `path` and all below it, ignoring errors, never following a symlink: a symlink at
        `path` is unlinked (not its target), and nothing is done below a symlinked directory."""
        try:
            dir_fd, name = self._open_parent(path)
        except OSError:
            return
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, ignore_errors=True, dir_fd=dir_fd)  # its fd-based walk never follows
            else:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    # -- reading -----------------------------------------------------------------------------

    def read_into(self, path: str, outs: list[memoryview], on_read: Callable[[memoryview], None] | None = None,
                  offset: int = 0) -> None:
        with open(self._open_regular(path), "rb", buffering=0) as f:
            wanted, size = offset + sum(out.nbytes for out in outs), os.fstat(f.fileno()).st_size
            if size < wanted:
                raise EOFError(f"{self.path(path)} is {size} bytes, expected at least {wanted}")
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            f.seek(offset)
            for out in outs:
                out = out.cast("B")
                filled = 0
                while filled < len(out):
                    n = f.readinto(out[filled:])
                    if not n:  # the file shrank since fstat
                        raise EOFError(f"{self.path(path)} ends at byte {offset + filled}, expected more")
                    filled += n
                offset += filled
                if on_read is not None:
                    on_read(out)

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file; `ValueError` if it holds more than `limit` bytes. Never reads more than
        `limit + 1` bytes, whatever size the file reports or however it grows meanwhile."""
        fd = self._open_regular(path)
        try:
            if os.fstat(fd).st_size > limit:
                raise _over_limit(self.path(path), limit)
            chunks, total = [], 0
            while total <= limit:
                chunk = os.read(fd, min(limit + 1 - total, _READ_BLOCK))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
            raise _over_limit(self.path(path), limit)
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        return self._lstat_regular(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.path(path))

    def is_regular_file(self, path: str) -> bool:
        try:
            self._lstat_regular(path)
        except (FileNotFoundError, UnsafePathError):
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        """Sorted names in directory `path`; [] when it is missing, not a directory, or reached
        through a symlink (a symlinked directory is not listed, as it is not inside the run dir)."""
        try:
            dir_fd = self._open_dir(path, _parts(path))
        except (FileNotFoundError, UnsafePathError):
            return []
        try:
            return sorted(os.listdir(dir_fd))
        finally:
            os.close(dir_fd)

    # -- the walk from the root ----------------------------------------------------------------

    def _open_dir(self, path: str, parts: list[str]) -> int:
        """A descriptor of directory `parts` below the root, no component followed if a symlink."""
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root may be a symlink
        try:
            for part in parts:
                with _refusing(self.path(path), "a regular file"):
                    dir_fd, parent = os.open(part, _DIR_FLAGS, dir_fd=dir_fd), dir_fd
                os.close(parent)
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd

    def _open_parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the directory holding `path`, the name of `path` in it)."""
        parts = _parts(path)
        if not parts:
            raise UnsafePathError(f"{self.path(path)}: not a regular file inside the run dir (it is the run dir)")
        return self._open_dir(path, parts[:-1]), parts[-1]

    def _lstat_regular(self, path: str) -> os.stat_result:
        dir_fd, name = self._open_parent(path)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)
        _require_regular(self.path(path), st)
        return st

    def _open_regular(self, path: str) -> int:
        """A blocking descriptor open for reading on the regular file `path`."""
        dir_fd, name = self._open_parent(path)
        try:
            _require_regular(self.path(path), os.stat(name, dir_fd=dir_fd, follow_symlinks=False))  # never open a device
            with _refusing(self.path(path), "a regular file"):
                fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            _require_regular(self.path(path), os.fstat(fd))  # the entry may have changed since the lstat
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _parts(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise UnsafePathError(f"{path}: not inside the run dir (absolute, or climbs out with '..')")
    return parts


@contextmanager
def _refusing(path: Path, kind: str) -> Iterator[None]:
    """Turn what `open` says of a symlink, a non-directory or a socket into `UnsafePathError`."""
    try:
        yield
    except OSError as e:
        if e.errno not in _UNSAFE_ERRNOS:
            raise
        raise UnsafePathError(f"{path}: not {kind} inside the run dir (a symlink or other entry is in the way: "
                              f"{e.strerror}); dtrain never follows symlinks below the run dir") from None


def _require_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path}: not a regular file inside the run dir (it is {_kind(st.st_mode)}); "
                              "dtrain reads only regular files and never follows symlinks below the run dir")


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for is_kind, name in kinds if is_kind(mode)), "an entry of unknown kind")


def _over_limit(path: Path, limit: int) -> ValueError:
    return ValueError(f"{path} is over the {limit}-byte limit for this kind of file")


def _unlink_file_or_link(name: str, dir_fd: int) -> bool:
    """Unlink `name` if it is a regular file or a symlink (the link, never its target)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            return False
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _make_root(root: Path) -> None:
    """Create the root and its missing ancestors, each made durable in its parent."""
    missing = []
    for p in [root.absolute(), *root.absolute().parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        fd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
