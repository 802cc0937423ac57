"""How the trainer reads its shares of the global batches: in process, or through DataLoader workers.

The data position stays the sampler's one global cursor (`ResumableSampler`): workers read ahead
(`prefetch_factor` batches each), but the snapshot records the steps *trained*, so batches a killed
or preempted run had prefetched are read again after the resume, none skipped, none twice.

Every batch is fetched under a generator seeded by (seed, step, rank), so whatever randomness a
dataset draws while reading (augmentation, random crops) is the same in process or in any worker,
and again after a resume; and the fetch never consumes the training process's own generator.
A sample that cannot be read stops the run with an error naming its index.

Example::

    batches = StepBatches(train_set, sampler, cfg.data, device, seed=0)
    for step, ids, (inputs, targets) in batches: ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from dtrain.config import AUTO, DataConfig
from dtrain.data import collate
from dtrain.errors import DTrainError
from dtrain.sampler import ResumableSampler

_STEP_MIX = 0x9E3779B97F4A7C15


class SampleReadError(DTrainError):
    """A sample of the training set raised while being read."""


class StepBatches:
    """(step, sample ids, batch) for this rank, from the step after the sampler's position on."""

    def __init__(self, dataset: Any, sampler: ResumableSampler, cfg: DataConfig, device: torch.device,
                 seed: int) -> None:
        self.fetch = _Fetch(dataset, seed, sampler.rank)
        self.sampler = sampler
        self.cfg = cfg
        self.pin = cfg.pin_memory is True or (cfg.pin_memory == AUTO and device.type == "cuda")
        self._loader: DataLoader | None = None

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, Any]]:
        steps = _NumberedShares(self.sampler)
        if self.cfg.num_workers == 0:
            return (self.fetch.__getitems__(share) for share in steps)
        self._loader = DataLoader(self.fetch, batch_sampler=steps, collate_fn=_as_is,
                                  num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch_factor,
                                  pin_memory=self.pin, multiprocessing_context="fork",
                                  # its own generator: drawing worker seeds must not advance training's
                                  generator=torch.Generator().manual_seed(self.fetch.seed))
        return iter(self._loader)


class _NumberedShares:
    """The sampler's shares, each with the step it is for (1-based), for `_Fetch` to seed by."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return enumerate(iter(self.sampler), start=self.sampler.step + 1)

    def __len__(self) -> int:  # DataLoader asks; the run is endless, the trainer stops it
        return 1 << 62


class _Fetch(torch.utils.data.Dataset):
    """Reads one step's share as one batch; a map-style dataset for DataLoader's batched fetch."""

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, share: tuple[int, list[int]]) -> tuple[int, torch.Tensor, Any]:
        step, ids = share
        index = torch.tensor(ids, dtype=torch.int64)
        with torch.random.fork_rng(devices=[]):  # CPU generator only; training's CUDA streams untouched
            torch.default_generator.manual_seed((self.seed * _STEP_MIX + step * 65537 + self.rank) % (1 << 63))
            try:
                return step, index, collate(self.dataset, index)
            except Exception as e:
                raise SampleReadError(_which_sample_failed(self.dataset, ids, step, e)) from e


def _which_sample_failed(dataset: Any, ids: list[int], step: int, error: Exception) -> str:
    """Name the first sample of the share that cannot be read on its own (or the share if each can)."""
    for i in ids:
        try:
            dataset[i]
        except Exception as e:
            return (f"sample {i} of the training set (step {step}) could not be read: {type(e).__name__}: {e}; "
                    "fix the dataset's __getitem__ for that index or remove the sample")
    return (f"the samples {ids[:8]}{'...' if len(ids) > 8 else ''} of step {step} could not be read together: "
            f"{type(error).__name__}: {error}; fix the dataset's batched fetch (__getitems__)")


def _as_is(batch: Any) -> Any:
    return batch


def micro_batches(batch: Any, size: int, count: int = 0) -> list[Any]:
    """Split a collated batch (tensors, or tuples/dicts of them, samples first) into pieces of at most
    `size` samples; the whole batch, once, when `size` is 0 or covers it. An empty batch stays one piece.
    With `count`, empty pieces are added up to `count` (FSDP needs as many forwards on every rank)."""
    n = _batch_len(batch)
    if size == 0 or n <= size:
        pieces = [batch]
    else:
        pieces = [torch.utils._pytree.tree_map(lambda t, lo=lo: t[lo:lo + size], batch) for lo in range(0, n, size)]
    empty = torch.utils._pytree.tree_map(lambda t: t[:0], batch)
    return pieces + [empty] * (count - len(pieces))


def micro_batch_count(global_len: int, world_size: int, size: int) -> int:
    """The most micro-batches any rank's share of a global batch of `global_len` splits into."""
    largest = -(-global_len // world_size)
    return max(1, -(-largest // size)) if size else 1


def _batch_len(batch: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError("a batch holds no tensor: the dataset must return tensors (or tuples/dicts of them)")
    return len(leaves[0])
