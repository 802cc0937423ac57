"""Find, verify and restore committed snapshots.

Restore reads each byte once, whatever the world size: the replicated files are spread over the
restoring ranks exactly as the writer spreads them (`plan.spread`), each rank reads and checks
its files, the ranks agree that every check passed, and each file is then broadcast from its
reader. Private files (per-rank RNG) are read only by their own rank, and only when the world
size is unchanged. Nothing is applied to the live model until every check has passed, so a
corrupt snapshot is refused whole and the caller can fall back to an older one.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.dist import DistContext, solo_context
from dtrain.errors import CorruptSnapshotError, NoSnapshotError
from dtrain.snapshot import layout
from dtrain.snapshot.manifest import DTYPES, MAX_MANIFEST_BYTES, FileEntry, Manifest, Piece
from dtrain.snapshot.plan import spread
from dtrain.snapshot.tree import unflatten
from dtrain.storage import Storage

logger = logging.getLogger(__name__)

_CRC_BLOCK = 8 << 20


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    objects: dict[str, Any]
    """The replicated objects (model, optimizer, ...), as state dicts of CPU tensors."""
    private: dict[str, Any] | None
    """This rank's private objects, or None when the snapshot was taken at another world size."""


def committed_steps(storage: Storage) -> list[int]:
    """Steps of the committed snapshots in the run dir, oldest first."""
    steps = []
    for name in storage.listdir(layout.SNAPSHOTS):
        step = layout.parse_step_dir(name)
        if step is not None and storage.exists(f"{layout.SNAPSHOTS}/{name}/{layout.MANIFEST}"):
            steps.append(step)
    return sorted(steps)


def read_manifest(storage: Storage, step: int) -> Manifest:
    path = f"{layout.committed_path(step)}/{layout.MANIFEST}"
    try:
        text = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as e:
        raise CorruptSnapshotError(f"{path}: cannot read the manifest ({e})") from None
    manifest = Manifest.from_json(text, path)
    if manifest.step != step:
        raise CorruptSnapshotError(f"{path}: manifest says step {manifest.step}, its directory says {step}")
    return manifest


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
    """The whole file as a uint8 tensor, after checking its size and CRC-32 against the manifest."""
    try:
        size = storage.size(path)
        if size != entry.bytes:
            raise CorruptSnapshotError(f"{path}: {size} bytes on disk, the manifest records {entry.bytes}")
        buf = torch.empty(entry.bytes, dtype=torch.uint8)
        storage.read_into(path, 0, memoryview(buf.numpy()))
    except (OSError, EOFError) as e:
        raise CorruptSnapshotError(f"{path}: cannot be read ({e})") from None
    view = memoryview(buf.numpy())
    crc = 0
    for start in range(0, len(view), _CRC_BLOCK):
        crc = zlib.crc32(view[start:start + _CRC_BLOCK], crc)
    if crc != entry.crc32:
        raise CorruptSnapshotError(f"{path}: checksum mismatch (crc32 {crc:08x}, the manifest records {entry.crc32:08x})")
    return buf


def restore(storage: Storage, step: int, ctx: DistContext | None = None) -> Restored:
    """Read snapshot `step` on every rank of `ctx` (or alone); raises CorruptSnapshotError on any bad byte."""
    ctx = ctx or solo_context()
    manifest = _agreed_manifest(storage, step, ctx)
    base = layout.committed_path(step)
    shared = sorted(n for n in manifest.files if not _is_rank_file(n))
    readers = spread([manifest.files[n].bytes for n in shared], ctx.world_size)
    mine = [n for n, r in zip(shared, readers) if r == ctx.rank]
    same_world = manifest.world_size == ctx.world_size
    own = [layout.rank_file(ctx.rank)] if same_world and layout.rank_file(ctx.rank) in manifest.files else []
    buffers, problems = _read_files(storage, base, manifest, mine + own)
    _agree_intact(ctx, step, "files", problems)
    index = _pieces_by_file(manifest)
    tensors: dict[str, torch.Tensor] = {}
    for name, reader in zip(shared, readers):
        buf = buffers.pop(name) if reader == ctx.rank else torch.empty(manifest.files[name].bytes, dtype=torch.uint8)
        ctx.broadcast(buf, src=reader)
        _scatter(buf, index.get(name, []), manifest, tensors)
    for name in own:
        _scatter(buffers.pop(name), index.get(name, []), manifest, tensors)
    objects = {k: unflatten(v, tensors) for k, v in manifest.objects.items()}
    private = {k: unflatten(v, tensors) for k, v in manifest.per_rank[ctx.rank].items()} if own else None
    return Restored(manifest, objects, private)


def read_tensors(storage: Storage, step: int, prefix: str) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Tensors whose key starts with `prefix`, read alone (for export); checks every file it reads."""
    manifest = read_manifest(storage, step)
    wanted = {k: e for k, e in manifest.tensors.items() if k.startswith(prefix)}
    names = sorted({p.file for e in wanted.values() for p in e.pieces})
    buffers, problems = _read_files(storage, layout.committed_path(step), manifest, names)
    if problems:
        raise CorruptSnapshotError("; ".join(problems))
    index = _pieces_by_file(manifest)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        _scatter(buffers.pop(name), index[name], manifest, tensors)
    return manifest, {k: t for k, t in tensors.items() if k in wanted}


def newest_step(storage: Storage) -> int:
    steps = committed_steps(storage)
    if not steps:
        raise NoSnapshotError(f"{getattr(storage, 'root', '?')}: no committed snapshot; train first, or check the run dir")
    return steps[-1]


def _is_rank_file(name: str) -> bool:
    return name.startswith("rank-")


def _agreed_manifest(storage: Storage, step: int, ctx: DistContext) -> Manifest:
    problem, manifest = "", None
    try:
        manifest = read_manifest(storage, step)
    except CorruptSnapshotError as e:
        problem = str(e)
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


def _read_files(storage: Storage, base: str, manifest: Manifest, names: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    buffers, problems = {}, []
    for name in names:
        try:
            buffers[name] = read_checked(storage, f"{base}/{name}", manifest.files[name])
        except CorruptSnapshotError as e:
            logger.warning("%s", e)
            problems.append(str(e))
    return buffers, problems


def _pieces_by_file(manifest: Manifest) -> dict[str, list[tuple[str, Piece]]]:
    index: dict[str, list[tuple[str, Piece]]] = {}
    for key, entry in manifest.tensors.items():
        for p in entry.pieces:
            index.setdefault(p.file, []).append((key, p))
    return index


def _scatter(buf: torch.Tensor, pieces: list[tuple[str, Piece]], manifest: Manifest,
             tensors: dict[str, torch.Tensor]) -> None:
    """Copy each piece out of a file's bytes into its tensor, allocating tensors on first use."""
    for key, p in pieces:
        if key not in tensors:
            entry = manifest.tensors[key]
            tensors[key] = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        flat = tensors[key].reshape(-1).view(torch.uint8)
        flat[p.tensor_offset:p.tensor_offset + p.nbytes].copy_(buf[p.file_offset:p.file_offset + p.nbytes])
