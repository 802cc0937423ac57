"""`ResumableSampler`: each rank's share of the global batches, resumable on any world size.

It is a batch sampler for `torch.utils.data.DataLoader` over dtrain's global order (`data`): step k
reads the same global batch whatever the world size, each rank a contiguous share of it. Its state
is one global cursor, so a snapshot taken at W ranks resumes at W' ranks on exactly the samples
the uninterrupted run would have read next.

A DataLoader with workers takes batches from its sampler ahead of training (`prefetch_factor`
per worker), so a sampler that counted what it handed out would record a position past what was
trained on, and a resume would skip those batches. This one records the position of the batches
*consumed*: the `Snapshotter` tells it the step before each save (`consumed(step)`), one global
batch a step. Saving it without a Snapshotter, call `sampler.consumed(step)` first.

Example::

    sampler = dtrain.ResumableSampler(len(dataset), global_batch_size=256, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, generator=torch.Generator())
    for step, batch in enumerate(loader, start=1): ...   # endless: it runs on through the epochs
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dtrain.data import Cursor, GlobalOrder, rank_share


class ResumableSampler:
    """This rank's share of each global batch, from the consumed position on, epoch after epoch."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, strict: bool = True) -> None:
        """`strict`: refuse to resume from the state of another dataset size or seed (the order would change)."""
        rank_now, world_now = _rank_and_world()
        self.rank = rank_now if rank is None else rank
        self.world_size = world_now if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if global_batch_size < self.world_size:
            raise ValueError(f"global_batch_size={global_batch_size} is below the world size ({self.world_size}): "
                             "every rank needs a sample; raise it or start fewer processes")
        self.order = GlobalOrder(num_samples, global_batch_size, seed)
        self.strict = strict
        self._anchor, self._anchor_step = Cursor(), 0
        self.step = 0
        """Steps consumed: the position this sampler resumes from and a snapshot records."""

    @property
    def cursor(self) -> Cursor:
        """The global position after the consumed steps."""
        return self.order.advance_by(self._anchor, self.step - self._anchor_step)

    def consumed(self, step: int) -> None:
        """Training has consumed the batches of steps 1..`step` (called by the Snapshotter)."""
        if step < self._anchor_step:
            raise ValueError(f"step {step} is before the step this sampler resumed at ({self._anchor_step})")
        self.step = step

    def global_batch_len(self, step: int) -> int:
        """Samples in the global batch of `step` (1-based): `global_batch_size`, or fewer at an epoch's end.
        Scale a share's summed loss by `world_size / global_batch_len` for the mean over the global batch."""
        at = self.order.advance_by(self._anchor, step - 1 - self._anchor_step)
        return len(self.order.batch_at(at))

    def __iter__(self) -> Iterator[list[int]]:
        cursor = self.cursor
        while True:
            yield rank_share(self.order.batch_at(cursor), self.rank, self.world_size).tolist()
            cursor = self.order.advance(cursor)

    def state_dict(self) -> dict[str, Any]:
        """World-size independent: the consumed position and what the order depends on."""
        cursor = self.cursor
        return {"step": self.step, "epoch": cursor.epoch, "offset": cursor.offset,
                "num_samples": self.order.num_samples, "seed": self.order.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = [f"{key}={state[key]}, this one {getattr(self.order, key)}" for key in ("num_samples", "seed")
                   if state[key] != getattr(self.order, key)]
        if changed and self.strict:
            raise ValueError(f"the snapshot's sampler has {'; '.join(changed)}: the data order would change and "
                             "samples would be repeated or skipped; use the same dataset and seed (or strict=False)")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if offset >= self.order.num_samples:  # a smaller dataset, accepted: its epoch is over
            epoch, offset = epoch + 1, 0
        self._anchor = Cursor(epoch, offset)
        self._anchor_step = self.step = int(state["step"])


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
