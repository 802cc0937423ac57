"""Find, verify and restore committed snapshots.

Restore reads each byte from storage once, whatever the world size. Across machines the
replicated files are spread over the restoring ranks exactly as the writer spreads them
(`plan.spread`), each rank reads and checks its files, the ranks agree that every check passed,
and each file is then broadcast from its reader. On one machine every rank reads every file
itself: the page cache turns all but the first read into a memory copy, which beats a broadcast
over loopback, and the check runs on every rank in parallel. Sharded state (FSDP) is read by the
ranks that hold it, each only the byte ranges of its own rows (`destinations`), each range checked
by the CRC-32C of the pieces it lies in. Per-rank files (each rank's RNG) are read only by their
own rank, and only when the world size is unchanged. A corrupt snapshot is refused whole, naming
every bad file, and the caller can fall back to an older one.

Bytes travel once through memory: each file is read straight into the tensors its pieces belong
to, checksummed as it arrives, and broadcast from there. Given the live state dicts (`into`), those
tensors are the live ones, and restoring costs little more than reading the files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.dist import DistContext, solo_context
from dtrain.errors import CorruptSnapshotError
from dtrain.snapshot import checksum, layout
from dtrain.snapshot.catalog import read_manifest
from dtrain.snapshot.destinations import Destinations, Need
from dtrain.snapshot.manifest import FileEntry, Manifest
from dtrain.snapshot.plan import spread
from dtrain.snapshot.tree import flatten, unflatten
from dtrain.storage import Storage

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    objects: dict[str, Any]
    """The replicated objects (model, optimizer, ...), as state dicts of CPU tensors."""
    per_rank: dict[str, Any] | None
    """This rank's own state (its RNG streams), or None when the snapshot was taken at another world size."""


def verify(storage: Storage, step: int) -> list[str]:
    """Problems found in a committed snapshot, each naming its file; empty when it verifies."""
    try:
        manifest = read_manifest(storage, step)
    except CorruptSnapshotError as e:
        return [str(e)]
    base = layout.committed_path(step)
    problems = []
    for name, entry in manifest.files.items():
        try:
            read_checked(storage, f"{base}/{name}", entry)
        except CorruptSnapshotError as e:
            problems.append(str(e))
    return problems


def read_checked(storage: Storage, path: str, entry: FileEntry) -> torch.Tensor:
    """The whole file as a uint8 tensor, after checking its size and CRC-32C against the manifest."""
    buf = torch.empty(entry.bytes, dtype=torch.uint8)
    read_into(storage, path, entry, [buf])
    return buf


def read_into(storage: Storage, path: str, entry: FileEntry, segments: list[torch.Tensor]) -> None:
    """Read a file straight into `segments` (uint8 tensors that tile it, in order), checking its
    size and CRC-32C against the manifest; each segment is checksummed while the next is read."""
    try:
        size = storage.size(path)
    except (OSError, EOFError) as e:
        raise CorruptSnapshotError(f"{path}: cannot be read ({e})") from None
    if size != entry.bytes:
        raise CorruptSnapshotError(f"{path}: {size} bytes on disk, the manifest records {entry.bytes}")
    _read_checked(storage, path, 0, segments, entry.crc32c)


def _read_checked(storage: Storage, path: str, offset: int, segments: list[torch.Tensor], expected: int) -> None:
    """Read bytes from `offset` into `segments`, their CRC-32C computed on a thread while the next arrives."""
    crc = _Checksum()
    try:
        storage.read_into(path, [memoryview(s.numpy()) for s in segments], crc.add, offset=offset)
    except (OSError, EOFError) as e:
        raise CorruptSnapshotError(f"{path}: cannot be read ({e})") from None
    finally:
        value = crc.value()
    if value != expected:
        where = "" if offset == 0 else f" in the {sum(s.numel() for s in segments)} bytes from byte {offset}"
        raise CorruptSnapshotError(f"{path}: checksum mismatch{where} (crc32c {value:08x}, the manifest records {expected:08x})")


def read_pieces(storage: Storage, path: str, entry: FileEntry, needs: list[Need]) -> None:
    """Read only the wanted parts of a file's pieces, each piece checked by its own CRC-32C: runs of
    adjacent whole pieces in one read, a piece wanted in part through a buffer of its size."""
    if any(n.piece.crc32c is None for n in needs):  # a version 2 snapshot: only whole files have a checksum
        whole = read_checked(storage, path, entry)
        for n in needs:
            start = n.piece.file_offset + n.lo - n.piece.tensor_offset
            n.out.copy_(whole[start:start + n.hi - n.lo])
        return
    for run in _runs(needs):
        first = run[0].piece
        if run[0].whole:
            _read_run(storage, path, run)
            continue
        buf = torch.empty(first.nbytes, dtype=torch.uint8)
        _read_checked(storage, path, first.file_offset, [buf], first.crc32c)
        run[0].out.copy_(buf[run[0].lo - first.tensor_offset:run[0].hi - first.tensor_offset])


def _runs(needs: list[Need]) -> list[list[Need]]:
    """Whole pieces adjacent in the file grouped together; each piece wanted in part alone."""
    runs: list[list[Need]] = []
    for n in needs:
        last = runs[-1][-1] if runs else None
        if last is not None and n.whole and last.whole and last.piece.file_offset + last.piece.nbytes == n.piece.file_offset:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _read_run(storage: Storage, path: str, run: list[Need]) -> None:
    """Whole adjacent pieces in one read, each checked against its own CRC-32C as it arrives."""
    expected = iter(run)
    bad: list[str] = []

    def check(data: memoryview) -> None:
        p = next(expected).piece
        if (got := checksum.extend(0, data)) != p.crc32c:
            bad.append(f"{path}: checksum mismatch in the {p.nbytes} bytes from byte {p.file_offset} "
                       f"(crc32c {got:08x}, the manifest records {p.crc32c:08x})")

    try:
        storage.read_into(path, [memoryview(n.out.numpy()) for n in run], check, offset=run[0].piece.file_offset)
    except (OSError, EOFError) as e:
        raise CorruptSnapshotError(f"{path}: cannot be read ({e})") from None
    if bad:
        raise CorruptSnapshotError(bad[0])


class _Checksum:
    """The CRC-32C of the bytes added so far, computed on a thread of its own, in order, so that
    checking a segment overlaps reading the next (both release the GIL)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtrain-crc")
        self._crc = 0

    def add(self, data: memoryview) -> None:
        self._pool.submit(self._extend, data)

    def _extend(self, data: memoryview) -> None:
        self._crc = checksum.extend(self._crc, data)

    def value(self) -> int:
        self._pool.shutdown(wait=True)
        return self._crc


def restore(storage: Storage, step: int, ctx: DistContext | None = None,
            into: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> Restored:
    """Read snapshot `step` on every rank of `ctx` (or alone); raises CorruptSnapshotError on any bad byte.

    `into` maps object names to live state dicts (`{"model": model.state_dict()}`): a saved tensor
    whose key, dtype and shape match a contiguous CPU tensor there is read straight into it, with
    no second copy in memory and no copy afterwards (`load_state_dict` of a tensor into itself is
    free). A DTensor there (FSDP) receives only its own rows, read from whichever files hold them.
    `into` may be a function returning them, called once the manifest is read.
    The price: when a check fails, those tensors hold a mix of bytes, and the caller must restore
    an older snapshot over them or not use them.

    Example::

        restored = restore(LocalStorage(run_dir), 120, ctx, into={"model": model.state_dict()})
        model.load_state_dict(restored.objects["model"])
    """
    ctx = ctx or solo_context()
    manifest = _agreed_manifest(storage, step, ctx)
    base = layout.committed_path(step)
    tensors = Destinations(manifest, _targets((into() if callable(into) else into) or {}))
    shared = sorted(n for n in manifest.files if not _is_per_rank_file(n))
    # Sharded targets: each rank reads its own rows. On one machine every rank reads every file it
    # needs: after the first reader the page cache serves it, faster than a broadcast over loopback.
    # Across machines, replicated state is read 1/W' per rank and broadcast.
    (sharded,) = ctx.any(tensors.sharded())
    broadcast = not ctx.is_one_host and not sharded
    readers = spread([manifest.files[n].bytes for n in shared], ctx.world_size) if broadcast else [ctx.rank] * len(shared)
    mine = [n for n, r in zip(shared, readers, strict=True) if r == ctx.rank]
    same_world = manifest.world_size == ctx.world_size
    own = [layout.per_rank_file(ctx.rank)] if same_world and layout.per_rank_file(ctx.rank) in manifest.files else []
    held = shared if broadcast else mine
    problems = _fits(storage, base, manifest, mine + own, held + own, tensors)
    if not problems:
        problems = _read_files(storage, base, manifest, mine + own, tensors)
    _agree_intact(ctx, step, "files", problems)
    if broadcast:
        for name, reader in zip(shared, readers, strict=True):
            segments = [n.out for n in tensors.needs(name)]
            if reader == ctx.rank:
                _send(ctx, segments)
            else:
                _receive(ctx, segments, src=reader)
    made = tensors.finish()
    objects = {k: unflatten(v, made) for k, v in manifest.objects.items()}
    per_rank = {k: unflatten(v, made) for k, v in manifest.per_rank[ctx.rank].items()} if own else None
    return Restored(manifest, objects, per_rank)


def read_tensors(storage: Storage, step: int, prefix: str) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Tensors whose key starts with `prefix`, read alone (for export); checks every file it reads."""
    manifest = read_manifest(storage, step)
    wanted = {k: e for k, e in manifest.tensors.items() if k.startswith(prefix)}
    stored = [manifest.tensors[e.view.base] if e.view else e for e in wanted.values()]
    names = sorted({p.file for e in stored for p in e.pieces})
    tensors = Destinations(manifest, {})
    base = layout.committed_path(step)
    problems = _fits(storage, base, manifest, names, names, tensors) or _read_files(storage, base, manifest, names, tensors)
    if problems:
        raise CorruptSnapshotError("; ".join(problems))
    return manifest, {k: t for k, t in tensors.finish().items() if k in wanted}


def _is_per_rank_file(name: str) -> bool:
    return name.startswith("rank-")


def _agreed_manifest(storage: Storage, step: int, ctx: DistContext) -> Manifest:
    problem, manifest = "", None
    try:
        manifest = read_manifest(storage, step)
    except Exception as e:  # whatever one rank meets reading it, all must fall back together
        problem = str(e) if isinstance(e, CorruptSnapshotError) else f"{type(e).__name__}: {e}"
    _agree_intact(ctx, step, "manifest", [problem] if problem else [])
    assert manifest is not None
    return manifest


def _agree_intact(ctx: DistContext, step: int, phase: str, problems: list[str]) -> None:
    """All ranks raise together if any rank found a problem, each naming every bad file."""
    (any_bad,) = ctx.any(bool(problems))
    if not any_bad:
        return
    reported = ctx.exchange(f"verify/{step}/{phase}", json.dumps(problems))
    everything = [p for r in reported for p in json.loads(r)]
    raise CorruptSnapshotError(f"snapshot {layout.step_dir_name(step)} failed verification: " + "; ".join(everything))


def _fits(storage: Storage, base: str, manifest: Manifest, names: list[str], held: list[str],
          tensors: Destinations) -> list[str]:
    """Problems that must stop a restore before it allocates anything: a file whose size on disk is
    not the manifest's, or more new tensor bytes than this machine has memory for."""
    problems = []
    for name in names:
        path = f"{base}/{name}"
        try:
            size = storage.size(path)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: cannot be read ({e})")
            continue
        if size != manifest.files[name].bytes:
            problems.append(f"{path}: {size} bytes on disk, the manifest records {manifest.files[name].bytes}")
    needed = tensors.bytes_to_allocate(held)
    available = available_memory()
    if needed > available:
        problems.append(f"{base}: restoring needs {needed} bytes of new tensors, this machine has {available} "
                        "available; the manifest is corrupt, or restore on machines with more memory")
    return problems


def available_memory() -> int:
    """Bytes the kernel could give this process now (MemAvailable), or unbounded where unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _read_files(storage: Storage, base: str, manifest: Manifest, names: list[str],
                tensors: Destinations) -> list[str]:
    problems = []
    for name in names:
        try:
            needs = tensors.needs(name)
            if tensors.wants_whole(name, needs):
                read_into(storage, f"{base}/{name}", manifest.files[name], [n.out for n in needs])
            elif needs:
                read_pieces(storage, f"{base}/{name}", manifest.files[name], needs)
        except CorruptSnapshotError as e:
            logger.warning("%s", e)
            problems.append(str(e))
        except Exception as e:  # an allocator or storage error is this snapshot's fault too: fall back together
            logger.warning("%s/%s: %s: %s", base, name, type(e).__name__, e)
            problems.append(f"{base}/{name}: cannot be restored ({type(e).__name__}: {e})")
    return problems


_BUCKET_BYTES = 1 << 20  # pieces under this travel packed together: one broadcast, not thousands


def _send(ctx: DistContext, segments: list[torch.Tensor]) -> None:
    small = _broadcast_large(ctx, segments, ctx.rank)
    if small:
        ctx.broadcast(torch.cat(small), src=ctx.rank)


def _receive(ctx: DistContext, segments: list[torch.Tensor], src: int) -> None:
    small = _broadcast_large(ctx, segments, src)
    if small:
        bucket = torch.empty(sum(s.numel() for s in small), dtype=torch.uint8)
        ctx.broadcast(bucket, src=src)
        for segment, part in zip(small, bucket.split([s.numel() for s in small]), strict=True):
            segment.copy_(part)


def _broadcast_large(ctx: DistContext, segments: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """Broadcast the large segments in place, each straight into its tensor; return the small ones."""
    small = []
    for segment in segments:
        if segment.numel() >= _BUCKET_BYTES:
            ctx.broadcast(segment, src=src)
        elif segment.numel():
            small.append(segment)
    return small


def _targets(into: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The live tensors that may receive bytes directly, by snapshot key."""
    found: dict[str, torch.Tensor] = {}
    for name, state in into.items():
        found.update(flatten(state, name)[1])
    return found
