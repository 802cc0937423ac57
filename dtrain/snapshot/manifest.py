"""The manifest: the JSON document that makes a directory of files a snapshot.

Rank 0 writes it last, after every rank's files are durable. It lists every file with its size
and CRC-32C, and every tensor with its dtype, shape and the byte ranges (pieces) that hold it.
Parsing treats it as hostile: file names must be plain names inside the snapshot, sizes and
counts must be plausible and consistent, and nothing in it is ever executed or unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from dtrain.errors import UnsafeSnapshotError

FORMAT = "dtrain-snapshot"
VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20
_MAX_FILES = 1_000_000
_MAX_TENSORS = 10_000_000
_MAX_BYTES = 1 << 50  # 1 PiB: any larger size is corruption, not data
_MAX_WORLD = 1 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
               torch.uint64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsafeSnapshotError(f"tensors of dtype {dtype} cannot be snapshotted; convert them to a standard dtype")
    return name


@dataclass(frozen=True)
class Piece:
    file: str
    file_offset: int
    tensor_offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: list[int]
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    crc32c: int
    writer: int


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    created_unix: float
    progress: dict[str, Any]
    metrics: dict[str, float]
    config: dict[str, Any]
    versions: dict[str, str]
    objects: dict[str, Any]
    """JSON skeletons of the replicated objects (model, optimizer, scheduler), see `tree`."""
    per_rank: list[dict[str, Any]]
    """Per rank, the skeletons of its private objects (its RNG)."""
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UnsafeSnapshotError(f"{where}: manifest is not valid JSON ({type(e).__name__}: {e})") from None
        try:
            manifest = _parse(raw)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UnsafeSnapshotError(f"{where}: manifest is malformed ({type(e).__name__}: {e})") from None
        check(manifest, where)
        return manifest


def _parse(raw: Any) -> Manifest:
    raw = _of(dict, raw, "manifest")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, expected {FORMAT!r} {VERSION}")
    tensors = {
        k: TensorEntry(_of(str, v["dtype"], "dtype"), [_int(d, "shape") for d in _of(list, v["shape"], "shape")],
                       [_piece(p) for p in _of(list, v["pieces"], "pieces")])
        for k, v in _bounded(raw["tensors"], _MAX_TENSORS, "tensors").items()
    }
    files = {k: FileEntry(_int(v["bytes"], "bytes"), _int(v["crc32c"], "crc32c"), _int(v["writer"], "writer"))
             for k, v in _bounded(raw["files"], _MAX_FILES, "files").items() if _fields(v, FileEntry, k)}
    return Manifest(
        step=_int(raw["step"], "step"), world_size=_int(raw["world_size"], "world_size"),
        created_unix=float(_of((int, float), raw["created_unix"], "created_unix")),
        progress=_of(dict, raw["progress"], "progress"), metrics=_of(dict, raw["metrics"], "metrics"),
        config=_of(dict, raw["config"], "config"), versions=_of(dict, raw["versions"], "versions"),
        objects=_of(dict, raw["objects"], "objects"),
        per_rank=[_of(dict, r, "per_rank") for r in _of(list, raw["per_rank"], "per_rank")],
        tensors=tensors, files=files, extra=_of(dict, raw.get("extra", {}), "extra"),
    )


def _piece(p: Any) -> Piece:
    p = _fields(p, Piece, "piece")
    return Piece(_of(str, p["file"], "file"), _int(p["file_offset"], "file_offset"),
                 _int(p["tensor_offset"], "tensor_offset"), _int(p["nbytes"], "nbytes"))


def _of(kind: type | tuple[type, ...], value: Any, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"`{what}` is {value!r}, of the wrong type")
    return value


def _fields(value: Any, cls: type, what: str) -> dict[str, Any]:
    """`value` as a dict with exactly the fields of dataclass `cls`: an unknown key is refused, not ignored."""
    value = _of(dict, value, what)
    expected = {f.name for f in fields(cls)}
    if set(value) != expected:
        raise TypeError(f"`{what}` has keys {sorted(value)}, expected {sorted(expected)}")
    return value


def _int(value: Any, what: str) -> int:
    return _of(int, value, what)


def _bounded(d: Any, limit: int, what: str) -> dict:
    if not isinstance(d, dict) or len(d) > limit:
        raise ValueError(f"`{what}` must be an object of at most {limit} entries")
    return d


def check(m: Manifest, where: str) -> None:
    """Refuse a manifest whose names or numbers could not come from a real save."""
    _expect(0 <= m.step < _MAX_BYTES, where, f"step {m.step} is out of range")
    _expect(1 <= m.world_size <= _MAX_WORLD, where, f"world_size {m.world_size} is out of range")
    _expect(len(m.per_rank) == m.world_size, where, f"{len(m.per_rank)} per-rank entries for world size {m.world_size}")
    for name, f in m.files.items():
        _expect(bool(_SAFE_NAME.fullmatch(name)) and ".." not in name, where,
                f"file name {name!r} is not a plain file name inside the snapshot")
        _expect(0 <= f.bytes <= _MAX_BYTES, where, f"file {name} claims {f.bytes} bytes")
        _expect(0 <= f.writer < m.world_size, where, f"file {name} has writer {f.writer}")
    for key, t in m.tensors.items():
        _check_tensor(key, t, m.files, where)
    _check_files_tiled(m, where)


def _check_tensor(key: str, t: TensorEntry, files: dict[str, FileEntry], where: str) -> None:
    _expect(t.dtype in DTYPES, where, f"tensor {key} has unknown dtype {t.dtype!r}")
    _expect(all(0 <= d <= _MAX_BYTES for d in t.shape) and len(t.shape) <= 64, where,
            f"tensor {key} has shape {t.shape}")
    _expect(t.nbytes <= _MAX_BYTES, where, f"tensor {key} claims {t.nbytes} bytes")
    covered = 0
    for p in t.pieces:
        _expect(p.file in files, where, f"tensor {key} refers to unlisted file {p.file!r}")
        _expect(p.tensor_offset == covered and p.nbytes >= 0, where, f"tensor {key} has a gap or overlap at byte {covered}")
        _expect(0 <= p.file_offset and p.file_offset + p.nbytes <= files[p.file].bytes, where,
                f"tensor {key} reads past the end of {p.file}")
        covered += p.nbytes
    _expect(covered == t.nbytes, where, f"tensor {key} pieces hold {covered} bytes, its shape needs {t.nbytes}")


def _check_files_tiled(m: Manifest, where: str) -> None:
    """Every file is its pieces end to end, as the writer packs them: a reader may then stream a
    file straight into its tensors, and no byte of a file is unaccounted for."""
    ends: dict[str, int] = {}
    for key, p in sorted(file_pieces(m), key=lambda kp: (kp[1].file, kp[1].file_offset, kp[1].nbytes)):
        end = ends.get(p.file, 0)
        _expect(p.file_offset == end, where, f"file {p.file} has a gap or overlap at byte {end} (tensor {key})")
        ends[p.file] = end + p.nbytes
    for name, f in m.files.items():
        _expect(ends.get(name, 0) == f.bytes, where,
                f"file {name} is {f.bytes} bytes, its pieces hold {ends.get(name, 0)}")


def file_pieces(m: Manifest) -> list[tuple[str, Piece]]:
    """Every (tensor key, piece) of the manifest."""
    return [(key, p) for key, t in m.tensors.items() for p in t.pieces]


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise UnsafeSnapshotError(f"{where}: refusing a hostile or corrupt manifest: {what}")
