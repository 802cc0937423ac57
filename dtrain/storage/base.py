"""The storage protocol the snapshot writer and reader use. Paths are relative to the run dir,
`/`-separated; a "directory" is a path prefix (real directories locally, key prefixes in a bucket).

It is shaped around what a POSIX filesystem and an object store share: streamed writes (`open_write`),
reads into caller buffers (`read_into`, `read_bytes`), listing, deletion, and one commit primitive.
The snapshot layer never asks which back-end it has:

- `save_dir(pending, final)` says where a save writes its files before its commit: the pending dir
  where the store can rename a directory, `final` itself where it cannot.
- `commit(save_dir, final, manifest_name, manifest)` writes the manifest last and makes the files
  visible as `final`: a rename of the pending dir locally; on S3 a conditional PUT of the manifest
  (`If-None-Match: *`). Either way a snapshot is committed if and only if its manifest is in `final`,
  and `CommitConflictError` is raised, never an overwrite, when another writer committed `final` first.
- `uncommit(final, aside, manifest_name)` makes a committed snapshot invisible in one atomic step (a rename into
  `aside`; on S3 the deletion of its manifest, first) and returns where its remaining files are, for
  `remove_tree`. A crash in between leaves an uncommitted remainder, never a torn snapshot.

Durability is part of the contract: `WriteHandle.close()` returns only after the bytes are stored
(fsynced locally; a completed upload on S3), and `commit` returns only after the commit is durable.

Reads accept only regular files inside the run dir: a path where a component below the run dir is
a symlink, or whose file is a FIFO, socket, device or directory, is refused with an `OSError`
naming it, so that a hostile run dir can neither hang a reader, nor feed it endless bytes, nor make
it read outside the run dir. (An object store has no such entries: every key is a plain object.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class CommitConflictError(OSError):
    """The snapshot was committed by another writer first; nothing of this one was made visible."""


class WriteHandle(Protocol):
    def write(self, data: memoryview) -> None: ...

    def close(self) -> None:
        """Finish the write durably; raise if any byte could not be stored."""
        ...

    def abort(self) -> None:
        """Give the write up after a failure, leaving no partial object that could be mistaken for a whole one."""
        ...


class Storage(Protocol):
    def describe(self, path: str = "") -> str:
        """Where `path` is, for a person to read: a filesystem path or an `s3://` URL."""
        ...

    # -- writing -------------------------------------------------------------------------------

    def open_write(self, path: str) -> WriteHandle: ...

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace `path` with `data` so that a reader sees the old or the new content, never a mix.
        A crash may leave a temporary file beside `path`; `remove_temp_files` deletes it."""
        ...

    def makedirs(self, path: str) -> None:
        """Create directory `path` and its missing parents, each durable once this returns (no-op on S3)."""
        ...

    def save_dir(self, pending: str, final: str) -> str:
        """Where a save that will commit as `final` writes its files: `pending` or `final` itself."""
        ...

    def commit(self, save_dir: str, final: str, manifest_name: str, manifest: bytes) -> None:
        """Write `manifest` last and make `save_dir`'s files visible as the snapshot `final`;
        `CommitConflictError` if `final` is committed already. Returns once the commit is durable."""
        ...

    def uncommit(self, final: str, aside: str, manifest_name: str) -> str:
        """Make the committed snapshot `final` invisible at once; return where its files remain."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete `path` and everything below it, ignoring errors and never following a symlink:
        a symlink at `path` is removed itself, its target is left alone. A manifest goes first."""
        ...

    def remove_temp_files(self, path: str) -> list[str]:
        """Delete what interrupted writes left below directory `path` (temporary files of
        `write_atomic`; unfinished multipart uploads on S3) and return their names. Only while no
        write into `path` can be running."""
        ...

    # -- reading -------------------------------------------------------------------------------

    def read_into(self, path: str, outs: list[memoryview], on_read: Callable[[memoryview], None] | None = None,
                  offset: int = 0) -> None:
        """Fill each of `outs` in turn with the next bytes of `path`, from byte `offset`; `on_read(out)`
        after each is filled, in order. Raise `EOFError` if the file is shorter, `OSError` if it is
        not a regular file inside the run dir."""
        ...

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file, refusing (`ValueError`) one larger than `limit` bytes without reading
        more than `limit + 1` of them, and (`OSError`) one that is not a regular file inside the run dir."""
        ...

    def size(self, path: str) -> int:
        """The size in bytes of the regular file `path`; `OSError` if it is not one inside the run dir."""
        ...

    def exists(self, path: str) -> bool:
        """Whether an entry named `path` exists, of any kind: a dangling symlink or a non-empty
        prefix counts. To ask whether there is something to read, use `is_regular_file`."""
        ...

    def is_regular_file(self, path: str) -> bool:
        """Whether `path` is a regular file reached from the run dir without following a symlink:
        what the read methods accept. False for a symlink, FIFO, socket, device or directory."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Sorted names in directory `path`; empty when it is missing, not a directory, or a symlink."""
        ...
