"""A POSIX filesystem, local or shared (NFS, Lustre), under one root directory."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_WRITE_BLOCK = 8 << 20  # large writes, but bounded, so a slow disk still reports progress per block
_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+$")  # what `write_atomic` writes before its rename


class LocalWriteHandle:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        for start in range(0, len(data), _WRITE_BLOCK):
            block = data[start:start + _WRITE_BLOCK]
            while block:
                written = os.write(self._fd, block)
                block = block[written:]

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


class LocalStorage:
    """Storage rooted at `root`; every path argument is relative to it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def open_write(self, path: str) -> LocalWriteHandle:
        return LocalWriteHandle(self.path(path))

    def write_atomic(self, path: str, data: bytes) -> None:
        final = self.path(path)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")  # matches _TEMP_NAME
        handle = LocalWriteHandle(tmp)
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
        removed = []
        for name in self.listdir(path):
            p = self.path(path) / name
            if _TEMP_NAME.match(name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(name)
        return removed

    def read_into(self, path: str, outs: list[memoryview], on_read: Callable[[memoryview], None] | None = None) -> None:
        with open(self.path(path), "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            offset = 0
            for out in outs:
                out = out.cast("B")
                filled = 0
                while filled < len(out):
                    n = f.readinto(out[filled:])
                    if not n:
                        raise EOFError(f"{self.path(path)} ends at byte {offset + filled}, expected more")
                    filled += n
                offset += filled
                if on_read is not None:
                    on_read(out)

    def read_bytes(self, path: str, limit: int) -> bytes:
        p = self.path(path)
        size = p.stat().st_size
        if size > limit:
            raise ValueError(f"{p} is {size} bytes, over the {limit}-byte limit for this kind of file")
        return p.read_bytes()

    def size(self, path: str) -> int:
        return self.path(path).stat().st_size

    def exists(self, path: str) -> bool:
        return self.path(path).exists()

    def listdir(self, path: str) -> list[str]:
        p = self.path(path)
        return sorted(os.listdir(p)) if p.is_dir() else []

    def makedirs(self, path: str) -> None:
        self.path(path).mkdir(parents=True, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.path(src), self.path(dst))

    def sync_dir(self, path: str) -> None:
        fd = os.open(self.path(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.path(path), ignore_errors=True)
