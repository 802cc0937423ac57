"""The storage protocol the snapshot writer and reader use. Paths are relative to the run dir.

Durability is part of the contract: `WriteHandle.close()` returns only after the bytes are on
stable storage, `sync_dir` makes renames and creations in a directory durable, and `rename` is
atomic (all or nothing) for files and directories alike.

Reads accept only regular files inside the run dir: a path where a component below the run dir is
a symlink, or whose file is a FIFO, socket, device or directory, is refused with an `OSError`
naming it, so that a hostile run dir can neither hang a reader, nor feed it endless bytes, nor make
it read outside the run dir.
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
        sequential pass; `on_read(out)` after each is filled. Raise `EOFError` if the file is
        shorter, `OSError` if it is not a regular file inside the run dir."""
        ...

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file, refusing (`ValueError`) one larger than `limit` bytes without reading
        more than `limit + 1` of them, and (`OSError`) one that is not a regular file inside the run dir."""
        ...

    def size(self, path: str) -> int:
        """The size in bytes of the regular file `path`; `OSError` if it is not one inside the run dir."""
        ...

    def exists(self, path: str) -> bool:
        """Whether an entry named `path` exists, of any kind: a dangling symlink counts.
        To ask whether there is something to read, use `is_regular_file`."""
        ...

    def is_regular_file(self, path: str) -> bool:
        """Whether `path` is a regular file reached from the run dir without following a symlink:
        what the read methods accept. False for a symlink, FIFO, socket, device or directory."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Sorted names in directory `path`; empty when it is missing, not a directory, or a symlink."""
        ...

    def makedirs(self, path: str) -> None:
        """Create directory `path` and its missing parents, each durable once this returns."""
        ...

    def rename(self, src: str, dst: str) -> None: ...

    def sync_dir(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None:
        """Delete `path` and everything below it, ignoring errors and never following a symlink:
        a symlink at `path` is removed itself, its target is left alone."""
        ...
