"""Which rank writes, and which rank reads, which bytes.

Sharded state (FSDP's parameters and optimizer state) is written by the ranks that hold it, each
its own rows (`plan_shards`, see `shards`). Replicated state (the DDP model and optimizer, identical on every rank) is written once in
total: its tensors are cut into pieces of at most `file_bytes`, packed in order into files of
about `file_bytes`, and the files are spread over the ranks by size, largest first, each to the
least loaded rank. Every rank computes the same plan from the same tensor sizes, so no message is
needed to agree on it. Restore uses the same spreading over the *new* world size: each rank reads
about 1/W' of the bytes and broadcasts them, so no byte is read twice whatever W' is.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from dtrain.snapshot.layout import replicated_file, shard_file


@dataclass(frozen=True)
class PlannedPiece:
    key: str
    tensor_offset: int
    nbytes: int
    file_offset: int


@dataclass(frozen=True)
class PlannedFile:
    name: str
    writer: int
    pieces: tuple[PlannedPiece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def plan_replicated(sizes: dict[str, int], world_size: int, file_bytes: int) -> list[PlannedFile]:
    """Files of the replicated tensors `sizes` (key -> bytes, in a fixed order) and their writers."""
    groups = _pack(_cut(sizes, file_bytes), file_bytes)
    writers = spread([sum(p.nbytes for p in g) for g in groups], world_size)
    return [PlannedFile(replicated_file(i), w, tuple(g)) for i, (g, w) in enumerate(zip(groups, writers, strict=True))]


def plan_shards(sizes: dict[str, int], rank: int, file_bytes: int) -> list[PlannedFile]:
    """Files of this rank's rows of sharded tensors (key -> bytes), all written by this rank."""
    groups = _pack(_cut(sizes, file_bytes), file_bytes) if sizes else []
    return [PlannedFile(shard_file(rank, i), rank, tuple(g)) for i, g in enumerate(groups)]


def plan_single_file(name: str, sizes: dict[str, int], writer: int) -> PlannedFile:
    pieces, offset = [], 0
    for key, n in sizes.items():
        pieces.append(PlannedPiece(key, 0, n, offset))
        offset += n
    return PlannedFile(name, writer, tuple(pieces))


def spread(loads: list[int], world_size: int) -> list[int]:
    """Assign each load to a rank: largest first, to the least loaded rank (lowest rank on ties)."""
    heap = [(0, r) for r in range(world_size)]
    owner = [0] * len(loads)
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        total, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (total + loads[i], rank))
    return owner


def _cut(sizes: dict[str, int], limit: int) -> list[tuple[str, int, int]]:
    """(key, offset, nbytes) pieces no larger than `limit`; an empty tensor is one empty piece."""
    pieces = []
    for key, n in sizes.items():
        starts = range(0, n, limit) if n else [0]
        pieces += [(key, s, min(limit, n - s)) for s in starts]
    return pieces


def _pack(pieces: list[tuple[str, int, int]], limit: int) -> list[list[PlannedPiece]]:
    groups: list[list[PlannedPiece]] = []
    used = 0
    for key, offset, n in pieces:
        if not groups or used + n > limit:
            groups.append([])
            used = 0
        groups[-1].append(PlannedPiece(key, offset, n, used))
        used += n
    return groups
