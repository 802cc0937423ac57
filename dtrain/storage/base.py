"""The storage protocol the snapshot writer and reader use. Paths are relative to the run dir.

Durability is part of the contract: `WriteHandle.close()` returns only after the bytes are on
stable storage, `sync_dir` makes renames and creations in a directory durable, and `rename` is
atomic (all or nothing) for files and directories alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class WriteHandle(Protocol):
    def write(self, data: memoryview) -> None: ...

    def close(self) -> None:
        """Flush and fsync; raise if any byte could not be stored."""
        ...

    def abort(self) -> None:
        """Close without the durability guarantee, after a failure."""
        ...


class Storage(Protocol):
    def open_write(self, path: str) -> WriteHandle: ...

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace `path` with `data` so that a reader sees the old or the new content, never a mix.
        A crash may leave a temporary file beside `path`; `remove_temp_files` deletes it."""
        ...

    def remove_temp_files(self, path: str) -> list[str]:
        """Delete the temporary files that interrupted `write_atomic` calls left in directory `path`
        and return their names. Only while no `write_atomic` into `path` can be running."""
        ...

    def read_into(self, path: str, outs: list[memoryview], on_read: Callable[[memoryview], None] | None = None) -> None:
        """Fill each of `outs` in turn with the next bytes of `path`, from its start, in one
        sequential pass; `on_read(out)` after each is filled. Raise if the file is shorter."""
        ...

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file, refusing one larger than `limit` bytes."""
        ...

    def size(self, path: str) -> int: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def makedirs(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def sync_dir(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...
