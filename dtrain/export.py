"""Model weights out of a snapshot, for inference, as one safetensors file.

The file is written as a stream: the header first (every tensor's dtype, shape and place comes
from the manifest), then each tensor's bytes, read piece by piece and checked against each piece's
CRC-32C on the way. A model sharded over many ranks (FSDP) is thereby exported whole, by one
process that never holds more than one piece of it in memory. Snapshots from before pieces had
checksums (format version 2) are read whole instead, then written.

The file holds the model's state dict under its own names and nothing that varies between runs,
so equal weights give equal bytes. Tied tensors (an embedding and its head) are written once per
name: safetensors has no aliases.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dtrain.errors import CorruptSnapshotError
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.destinations import Need
from dtrain.snapshot.manifest import DTYPES, Manifest, Piece, TensorEntry, contiguous_strides
from dtrain.snapshot.tree import TENSOR, unflatten
from dtrain.storage import Storage

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}


@dataclass(frozen=True)
class _Source:
    """Where an exported tensor's bytes are: the stored tensor `key`, from byte `start`."""

    name: str
    entry: TensorEntry
    key: str
    start: int


def export_safetensors(storage: Storage, step: int | None, out: Path, best: bool = False) -> int:
    """Write the model of snapshot `step` (default: the newest, or the best with `best`) to `out`."""
    if step is None:
        step = catalog.best_step(storage) if best else catalog.newest_step(storage)
    manifest = catalog.read_manifest(storage, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = _sources(manifest)
    if sources is None:
        _export_in_memory(storage, step, out)
    else:
        _export_streaming(storage, manifest, sources, out)
        logger.info("exported %d tensors of step %d to %s", len(sources), step, out)
    return step


def _sources(manifest: Manifest) -> list[_Source] | None:
    """The model's tensors and where their bytes are, in file order; None when they cannot be
    streamed (a version 2 snapshot, or a tensor stored as a strided view into shared bytes)."""
    sources = []
    for name, value in manifest.objects.get("model", {}).items():
        if not (isinstance(value, dict) and set(value) == {TENSOR}):
            continue
        key = value[TENSOR]
        entry = manifest.tensors[key]
        key, start = key, 0
        if entry.view is not None:
            if entry.view.stride != contiguous_strides(entry.shape):
                return None
            key, start = entry.view.base, entry.view.byte_offset
        if any(p.crc32c is None for p in manifest.tensors[key].pieces) or entry.dtype not in _SAFETENSORS_DTYPES:
            return None
        sources.append(_Source(name, entry, key, start))
    # widest elements first, as safetensors itself lays files out: every tensor stays aligned
    return sorted(sources, key=lambda s: (-DTYPES[s.entry.dtype].itemsize, s.name))


def _export_streaming(storage: Storage, manifest: Manifest, sources: list[_Source], out: Path) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in sources:
        header[s.name] = {"dtype": _SAFETENSORS_DTYPES[s.entry.dtype], "shape": s.entry.shape,
                          "data_offsets": [offset, offset + s.entry.nbytes]}
        offset += s.entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = layout.committed_path(manifest.step)
    partial = out.with_name(f".{out.name}.partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for s in sources:
            for piece, lo, hi in _overlapping(manifest.tensors[s.key].pieces, s.start, s.start + s.entry.nbytes):
                buf = torch.empty(hi - lo, dtype=torch.uint8)
                need = Need(s.key, piece, lo, hi, buf)
                reader.read_pieces(storage, f"{base}/{piece.file}", manifest.files[piece.file], [need])
                f.write(memoryview(buf.numpy()))
        f.flush()
        os.fsync(f.fileno())
    partial.replace(out)


def _overlapping(pieces: list[Piece], lo: int, hi: int) -> list[tuple[Piece, int, int]]:
    """The pieces holding bytes [lo, hi) of their tensor, each with the part of the range it holds."""
    found = []
    for p in sorted(pieces, key=lambda p: p.tensor_offset):
        a, b = max(lo, p.tensor_offset), min(hi, p.tensor_offset + p.nbytes)
        if a < b:
            found.append((p, a, b))
    if sum(b - a for _, a, b in found) != hi - lo:
        raise CorruptSnapshotError(f"the manifest's pieces do not hold bytes {lo}..{hi} of a tensor")
    return found


def _export_in_memory(storage: Storage, step: int, out: Path) -> None:
    manifest, tensors = reader.read_tensors(storage, step, "model/")
    state = unflatten(manifest.objects["model"], tensors)
    weights = _unshared({name: t for name, t in state.items() if isinstance(t, torch.Tensor)})
    save_file(weights, str(out), metadata={"format": "pt"})
    logger.info("exported %d tensors of step %d to %s", len(weights), step, out)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory: safetensors refuses tied tensors (an embedding and its
    tied head), so each name after the first of a storage gets its own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.contiguous() if ptr not in seen or t.numel() == 0 else t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
    return out
