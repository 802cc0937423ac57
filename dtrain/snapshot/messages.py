"""The messages of the commit protocol, as typed values: what the caller records with a snapshot
(`SnapshotMeta`), what each rank reports to rank 0 once its files are durable (`ShardReport`), and
what rank 0 publishes once it committed the save or gave it up (`Outcome`). The last two travel
as JSON through the group's store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dtrain.snapshot.manifest import FileEntry, Piece, TensorEntry, View


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot records besides the state: where training stands, the metrics that rank it
    for retention, the settings of the run and the software that wrote it."""

    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def frozen(self) -> SnapshotMeta:
        """A deep copy as JSON would hold it: later changes to the caller's dicts must not leak in."""
        return SnapshotMeta(**json.loads(json.dumps(asdict(self))))


@dataclass(frozen=True)
class ShardReport:
    """What one rank tells rank 0 once its files are durable (or could not be written)."""

    rank: int
    files: dict[str, FileEntry]
    error: str | None
    per_rank: dict[str, Any]
    """The JSON skeletons of this rank's own state (its RNG streams)."""
    per_rank_tensors: dict[str, TensorEntry]
    sharded_tensors: dict[str, TensorEntry]
    """Every sharded tensor, with the pieces of the rows this rank wrote."""
    piece_crcs: dict[str, list[list[int]]]
    """For each file written, `[file_offset, nbytes, crc32c]` of each of its pieces."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: bytes) -> ShardReport:
        raw = json.loads(text)
        return cls(raw["rank"], {k: FileEntry(**f) for k, f in raw["files"].items()}, raw["error"], raw["per_rank"],
                   {k: _entry_from_json(e) for k, e in raw["per_rank_tensors"].items()},
                   {k: _entry_from_json(e) for k, e in raw["sharded_tensors"].items()}, raw["piece_crcs"])


@dataclass(frozen=True)
class Outcome:
    """What rank 0 publishes once it committed a save, or gave it up."""

    path: str | None
    bytes: int = 0
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: bytes) -> Outcome:
        return cls(**json.loads(text))


def _entry_from_json(d: dict[str, Any]) -> TensorEntry:
    view = View(**d["view"]) if d.get("view") else None
    return TensorEntry(d["dtype"], d["shape"], [Piece(**p) for p in d["pieces"]], view)
