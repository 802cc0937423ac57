"""Sharded tensors (DTensors, as FSDP2 holds parameters and optimizer state): what each rank holds
of the whole tensor, for writing its part once and reading back only the part it needs.

A DTensor sharded along dim 0 (FSDP2's `Shard(0)`), possibly replicated over other mesh dims
(HSDP), holds on each rank a run of whole rows: a contiguous byte range of the whole tensor laid
out row-major. That makes the snapshot's format for it the format of any tensor: pieces at their
offsets in the whole tensor's bytes, here written by the ranks that hold them, one replica each.
Restore reads, for a DTensor target, exactly the byte range of its local rows, whatever the world
size that wrote them, and a full tensor target reads every piece: a snapshot saved sharded loads
into a replicated model and the reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dtrain.errors import SnapshotError
from dtrain.snapshot.manifest import Manifest


@dataclass(frozen=True)
class LocalRows:
    """This rank's part of a sharded tensor."""

    local: torch.Tensor
    """The rows this rank holds, a plain tensor sharing the DTensor's memory."""
    shape: list[int]
    """The whole tensor's shape."""
    byte_offset: int
    """Where `local` starts in the whole tensor's row-major bytes."""
    writes: bool
    """Whether this rank writes these rows: the first replica of them does, the others do not."""


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local_rows(key: str, t: DTensor) -> LocalRows:
    """The rows of `t` this rank holds; refuses, naming `key`, a layout that is not whole rows."""
    placements = tuple(t.placements)
    if not all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements):
        raise SnapshotError(f"{key}: a DTensor placed {placements} cannot go into a snapshot; dtrain stores "
                            "tensors sharded along dim 0 (FSDP2's default) and replicated; use fully_shard "
                            "without shard_placement_fn, or redistribute it to Shard(0) in state_dict()")
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    local = t.to_local()
    if coordinate is None:  # this rank is not in the tensor's mesh: it holds nothing of it
        return LocalRows(local.new_empty((0, *t.shape[1:])), list(t.shape), 0, False)
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(local.shape) != tuple(local_shape):
        raise SnapshotError(f"{key}: its local shard has shape {tuple(local.shape)}, the DTensor's layout says "
                            f"{tuple(local_shape)}; save it through state_dict(), which unpads FSDP2's shards")
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    writes = all(c == 0 for c, p in zip(coordinate, placements, strict=True) if isinstance(p, Replicate))
    return LocalRows(local, list(t.shape), (offset[0] if t.ndim else 0) * row_bytes, writes)


def same_rows(a: LocalRows, b: LocalRows) -> bool:
    """Whether two keys hold the same memory as the same part of equal tensors (a tied parameter).

    Every rank must reach the same answer, so an empty shard still counts: FSDP2's empty shards are
    views into the parameter's padded storage, which is never empty."""
    ptr = a.local.untyped_storage().data_ptr()
    same_memory = ptr != 0 and (ptr, a.local.storage_offset()) == (
        b.local.untyped_storage().data_ptr(), b.local.storage_offset())
    return same_memory and (a.shape, a.byte_offset, a.local.dtype) == (b.shape, b.byte_offset, b.local.dtype)


def row_layout(manifest: Manifest) -> dict[str, list[tuple[int, int, int]]]:
    """Each sharded tensor's rows by the rank that wrote them: key -> [(rank, first row, end row)]."""
    layout: dict[str, list[tuple[int, int, int]]] = {}
    for key, entry in manifest.tensors.items():
        if not entry.pieces or not all(p.file.startswith("shard-") for p in entry.pieces):
            continue
        row = max(1, entry.nbytes // max(1, entry.shape[0] if entry.shape else 1))
        spans: list[tuple[int, int, int]] = []
        for p in sorted(entry.pieces, key=lambda p: p.tensor_offset):
            writer = manifest.files[p.file].writer
            lo, hi = p.tensor_offset // row, (p.tensor_offset + p.nbytes) // row
            if spans and spans[-1][0] == writer and spans[-1][2] == lo:
                spans[-1] = (writer, spans[-1][1], hi)
            elif hi > lo:
                spans.append((writer, lo, hi))
        layout[key] = spans
    return layout


__all__ = ["DTensor", "LocalRows", "Replicate", "Shard", "is_sharded", "local_rows", "row_layout", "same_rows"]
