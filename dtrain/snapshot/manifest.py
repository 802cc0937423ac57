"""The manifest: the JSON document that makes a directory of files a snapshot.

Rank 0 writes it last, after every rank's files are durable. It lists every file with its size
and CRC-32C, and every tensor with its dtype, shape and the byte ranges (pieces) that hold it.
Tensors that shared storage when saved (tied weights, a buffer that views a parameter) are stored
once: a uint8 tensor holds the shared bytes and each of them is a `View` of it.

It holds every non-tensor value of the state too (step, data cursor, learning rates, Python RNG
state), so its own bytes are checksummed like the files': `manifest.json` is one header line,
`dtrain-snapshot 3 crc32c=XXXXXXXX bytes=N`, then N bytes of JSON whose CRC-32C the header gives.
A changed digit anywhere is corruption, never a silently different resume.

Parsing treats it as hostile: file names must be plain names inside the snapshot, sizes and
counts must be plausible and consistent, and nothing in it is ever executed or unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from dtrain.errors import CorruptSnapshotError, UnsafeSnapshotError
from dtrain.snapshot import checksum

FORMAT = "dtrain-snapshot"
VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Version 3 gives every piece its own CRC-32C, so a rank can check the part of a file it reads."""
_HEADER = re.compile(rb"dtrain-snapshot (\d+) crc32c=([0-9a-f]{8}) bytes=(\d+)\n")
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
    """Where the piece starts in the bytes of the whole tensor (row-major), whoever held them."""
    nbytes: int
    crc32c: int | None = None
    """The CRC-32C of the piece's bytes (None in version 2 snapshots: only whole files are checked)."""


@dataclass(frozen=True)
class View:
    """A tensor that lives inside another one's bytes: `base` (a 1-d uint8 tensor) from `byte_offset`, with `stride`."""

    base: str
    byte_offset: int
    stride: list[int]


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: list[int]
    pieces: list[Piece]
    """Where its bytes are, in order; empty for a view."""
    view: View | None = None

    def is_alias_of(self, base: TensorEntry) -> bool:
        """Whether this view is the whole of `base`, a tensor of its own dtype and shape (a tied,
        sharded parameter stored once), rather than a view into a shared uint8 base."""
        return (self.view is not None and self.view.byte_offset == 0 and self.view.stride == contiguous_strides(self.shape)
                and (base.dtype, base.shape) == (self.dtype, self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def extent(self) -> int:
        """Bytes a view spans in its base, from its first element to past its last."""
        if math.prod(self.shape) == 0 or self.view is None:
            return 0
        last = sum((n - 1) * s for n, s in zip(self.shape, self.view.stride, strict=True))
        return (last + 1) * DTYPES[self.dtype].itemsize


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
    """Per rank, the skeletons of its per-rank state (its RNG streams)."""
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    format: str = FORMAT
    version: int = VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def to_bytes(self) -> bytes:
        """The contents of `manifest.json`: the checksummed header line, then the JSON."""
        return with_header(self.to_json().encode())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse `manifest.json` after checking its header's length and CRC-32C."""
        header, _, body = data.partition(b"\n")
        found = _HEADER.fullmatch(header + b"\n")
        if found is None or int(found[1]) not in READABLE_VERSIONS:
            raise UnsafeSnapshotError(f"{where}: not a {FORMAT} {VERSION} manifest (it starts {header[:60]!r}); "
                                      "it was written by another version or is corrupt")
        crc = checksum.extend(0, memoryview(body))
        if len(body) != int(found[3]) or crc != int(found[2], 16):
            raise CorruptSnapshotError(f"{where}: checksum mismatch ({len(body)} bytes with crc32c {crc:08x}, "
                                       f"the header records {int(found[3])} bytes with crc32c {found[2].decode()})")
        return cls.from_json(body, where)

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


def with_header(body: bytes) -> bytes:
    """`body` behind the header line that records its length and CRC-32C."""
    crc = checksum.extend(0, memoryview(body))
    return f"{FORMAT} {VERSION} crc32c={crc:08x} bytes={len(body)}\n".encode() + body


def _parse(raw: Any) -> Manifest:
    raw = _of(dict, raw, "manifest")
    if raw.get("format") != FORMAT or raw.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, expected {FORMAT!r} {VERSION}")
    version = raw["version"]
    tensors = {k: _tensor(v, k, version) for k, v in _bounded(raw["tensors"], _MAX_TENSORS, "tensors").items()}
    files = {k: FileEntry(_int(v["bytes"], "bytes"), _int(v["crc32c"], "crc32c"), _int(v["writer"], "writer"))
             for k, v in _bounded(raw["files"], _MAX_FILES, "files").items() if _fields(v, FileEntry, k)}
    return Manifest(
        step=_int(raw["step"], "step"), world_size=_int(raw["world_size"], "world_size"),
        created_unix=float(_of((int, float), raw["created_unix"], "created_unix")),
        progress=_of(dict, raw["progress"], "progress"), metrics=_of(dict, raw["metrics"], "metrics"),
        config=_of(dict, raw["config"], "config"), versions=_of(dict, raw["versions"], "versions"),
        objects=_of(dict, raw["objects"], "objects"),
        per_rank=[_of(dict, r, "per_rank") for r in _of(list, raw["per_rank"], "per_rank")],
        tensors=tensors, files=files, version=version,
    )


def _tensor(v: Any, key: str, version: int) -> TensorEntry:
    v = _fields(v, TensorEntry, key)
    view = None
    if v["view"] is not None:
        w = _fields(v["view"], View, f"{key}.view")
        view = View(_of(str, w["base"], "base"), _int(w["byte_offset"], "byte_offset"),
                    [_int(d, "stride") for d in _of(list, w["stride"], "stride")])
    return TensorEntry(_of(str, v["dtype"], "dtype"), [_int(d, "shape") for d in _of(list, v["shape"], "shape")],
                       [_piece(p, version) for p in _of(list, v["pieces"], "pieces")], view)


def _piece(p: Any, version: int) -> Piece:
    if version == 2:  # pieces had no checksum of their own
        p = {**_of(dict, p, "piece"), "crc32c": None}
    p = _fields(p, Piece, "piece")
    crc = None if version == 2 else _int(p["crc32c"], "crc32c")
    return Piece(_of(str, p["file"], "file"), _int(p["file_offset"], "file_offset"),
                 _int(p["tensor_offset"], "tensor_offset"), _int(p["nbytes"], "nbytes"), crc)


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
        if t.view is not None:
            _check_view(key, t, m.tensors, where)
    _check_files_tiled(m, where)


def _check_tensor(key: str, t: TensorEntry, files: dict[str, FileEntry], where: str) -> None:
    _expect(t.dtype in DTYPES, where, f"tensor {key} has unknown dtype {t.dtype!r}")
    _expect(all(0 <= d <= _MAX_BYTES for d in t.shape) and len(t.shape) <= 64, where,
            f"tensor {key} has shape {t.shape}")
    _expect(t.nbytes <= _MAX_BYTES, where, f"tensor {key} claims {t.nbytes} bytes")
    if t.view is not None:
        _expect(not t.pieces, where, f"tensor {key} is a view and also has pieces")
        return
    covered = 0
    for p in t.pieces:
        _expect(p.file in files, where, f"tensor {key} refers to unlisted file {p.file!r}")
        _expect(p.tensor_offset == covered and p.nbytes >= 0, where, f"tensor {key} has a gap or overlap at byte {covered}")
        _expect(p.file_offset >= 0 and p.file_offset + p.nbytes <= files[p.file].bytes, where,
                f"tensor {key} reads past the end of {p.file}")
        covered += p.nbytes
    _expect(covered == t.nbytes, where, f"tensor {key} pieces hold {covered} bytes, its shape needs {t.nbytes}")


def _check_view(key: str, t: TensorEntry, tensors: dict[str, TensorEntry], where: str) -> None:
    """A view must lie inside a stored 1-d uint8 base, aligned for its dtype, or be an alias: the
    whole of a stored tensor of its own dtype and shape."""
    v = t.view
    base = tensors.get(v.base)
    if base is not None and base.view is None and t.is_alias_of(base):
        return
    _expect(base is not None and base.view is None and base.dtype == "uint8" and len(base.shape) == 1, where,
            f"tensor {key} is a view of {v.base!r}, which is not a stored uint8 tensor")
    _expect(len(v.stride) == len(t.shape) and all(0 <= s <= _MAX_BYTES for s in v.stride), where,
            f"tensor {key} has strides {v.stride} for shape {t.shape}")
    _expect(v.byte_offset >= 0 and v.byte_offset % DTYPES[t.dtype].itemsize == 0, where,
            f"tensor {key} starts at byte {v.byte_offset} of its base, not aligned for {t.dtype}")
    _expect(v.byte_offset + t.extent <= base.nbytes, where, f"tensor {key} reads past the end of its base {v.base}")


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


def contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


def file_pieces(m: Manifest) -> list[tuple[str, Piece]]:
    """Every (tensor key, piece) of the manifest."""
    return [(key, p) for key, t in m.tensors.items() for p in t.pieces]


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise UnsafeSnapshotError(f"{where}: refusing a hostile or corrupt manifest: {what}")
