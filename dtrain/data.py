"""Which samples each step reads, independent of how many ranks read them.

The data position is a global cursor, `(epoch, offset)`: the number of samples of the current
epoch already consumed, the same on every rank. Each epoch's order is a permutation seeded by
`(seed, epoch)`. A step takes the next `global_batch_size` positions of that order (fewer for the
last, partial batch of an epoch) and splits them into contiguous shares, one per rank, whose
sizes differ by at most one. Because the batch of a step depends only on the cursor, a run that
resumes on another world size reads exactly the samples it would have read: none skipped, none
repeated.

Example::

    order = GlobalOrder(num_samples=1000, global_batch_size=64, seed=0)
    batch = order.batch_at(Cursor(epoch=0, offset=128))   # the third step's 64 sample ids
    mine = rank_share(batch, rank=1, world_size=3)        # ids 22..42 of those
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPOCH_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) over the seed space


@dataclass(frozen=True)
class Cursor:
    """The global data position: samples of `epoch` already consumed by all ranks together."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Cursor:
        return cls(epoch=int(d["epoch"]), offset=int(d["offset"]))


class GlobalOrder:
    """The seeded sample order of every epoch, and the global batches read from it."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples}); a training set needs samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * _EPOCH_MIX + epoch) % (1 << 63))
            self._cached = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._cached[1]

    def batch_at(self, cursor: Cursor) -> torch.Tensor:
        """The sample ids of the global batch that starts at `cursor`."""
        if not 0 <= cursor.offset < self.num_samples:
            raise ValueError(f"cursor offset {cursor.offset} is outside an epoch of {self.num_samples} samples")
        end = min(cursor.offset + self.global_batch_size, self.num_samples)
        return self.permutation(cursor.epoch)[cursor.offset:end]

    def advance(self, cursor: Cursor) -> Cursor:
        """The cursor after the batch at `cursor` was consumed."""
        end = min(cursor.offset + self.global_batch_size, self.num_samples)
        if end == self.num_samples:
            return Cursor(cursor.epoch + 1, 0)
        return Cursor(cursor.epoch, end)

    def advance_by(self, cursor: Cursor, batches: int) -> Cursor:
        """The cursor after `batches` more global batches, in O(1)."""
        left = -(-(self.num_samples - cursor.offset) // self.global_batch_size)  # batches to finish this epoch
        if batches < left:
            return Cursor(cursor.epoch, cursor.offset + batches * self.global_batch_size)
        epochs, batches = divmod(batches - left, self.steps_per_epoch())
        return Cursor(cursor.epoch + 1 + epochs, batches * self.global_batch_size)

    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch_size)


def share_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share; the first `batch_size % world_size` ranks get one more."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_share(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    start, end = share_bounds(len(batch), rank, world_size)
    return batch[start:end]


def collate(dataset: object, ids: torch.Tensor) -> object:
    """Fetch `ids` from a map-style dataset as one batch (the dataset's own batched fetch when it has one)."""
    id_list = ids.tolist()
    if not id_list:
        # A rank whose share of the last, partial batch is empty still runs forward and
        # backward (DDP needs every rank in the all-reduce): give it a zero-length batch.
        return torch.utils._pytree.tree_map(lambda x: x[:0], collate(dataset, torch.tensor([0])))
    fetch_many = getattr(dataset, "__getitems__", None)
    samples = fetch_many(id_list) if fetch_many else [dataset[i] for i in id_list]
    if isinstance(samples, (tuple, torch.Tensor)):
        return samples
    return torch.utils.data.default_collate(samples)
