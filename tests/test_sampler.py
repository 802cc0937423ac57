"""`ResumableSampler`: every sample exactly once across resumes on other world sizes, with DataLoader
workers prefetching ahead of training, and the DataLoader's seed draw kept off the global generator."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dtrain.data import Cursor, GlobalOrder
from dtrain.sampler import ResumableSampler


class Ids(Dataset):
    """Each sample is its own index: a batch shows exactly which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def _samplers(n: int, batch: int, world: int, state: dict | None = None) -> list[ResumableSampler]:
    found = []
    for rank in range(world):
        s = ResumableSampler(n, batch, seed=7, rank=rank, world_size=world)
        if state is not None:
            s.load_state_dict(state)
        found.append(s)
    return found


def _train(samplers: list[ResumableSampler], steps: int, start: int, workers: int) -> tuple[list[list[int]], dict]:
    """Each rank's loader for `steps` steps from `start`; the global batch of every step, and the state after."""
    loaders = [iter(DataLoader(Ids(s.order.num_samples), batch_sampler=s, num_workers=workers,
                               generator=torch.Generator(), prefetch_factor=4 if workers else None))
               for s in samplers]
    batches = []
    for _ in range(steps):
        batches.append([i for loader in loaders for i in next(loader).tolist()])
    for s in samplers:
        s.consumed(start + steps)  # what the Snapshotter does before a save
    return batches, samplers[0].state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_through_world_sizes_2_3_1_with_prefetching_workers(workers: int) -> None:
    n, batch, total = 100, 16, 21  # 7 steps an epoch, the last one partial: three epochs
    straight, _ = _train(_samplers(n, batch, 2), total, 0, 0)
    got, state = _train(_samplers(n, batch, 2), 5, 0, workers)  # the workers fetched ahead of step 5
    for world, steps in ((3, 9), (1, total - 14)):
        more, state = _train(_samplers(n, batch, world, state), steps, len(got), workers)
        got += more
    assert got == straight  # the same global batches, in the same steps
    for epoch in range(3):
        seen = sorted(i for b in got[7 * epoch:7 * (epoch + 1)] for i in b)
        assert seen == list(range(n)), f"epoch {epoch} read a sample twice or skipped one"


def test_the_state_is_the_consumed_position_not_what_the_loader_fetched() -> None:
    [s] = _samplers(64, 8, 1)
    loader = iter(DataLoader(Ids(64), batch_sampler=s, num_workers=2, prefetch_factor=4, generator=torch.Generator()))
    next(loader)
    next(loader)  # the workers have taken up to 8 more batches from the sampler by now
    s.consumed(2)
    assert s.state_dict()["offset"] == 16 and s.state_dict()["step"] == 2


def test_the_state_does_not_depend_on_the_world_size() -> None:
    states = []
    for world in (1, 2, 3):
        samplers = _samplers(50, 6, world)
        for sampler in samplers:
            sampler.consumed(11)
        states.append({s.rank: s.state_dict() for s in samplers})
    assert all(state == states[0][0] for per_world in states for state in per_world.values())


@pytest.mark.parametrize("n, batch, start, batches", [
    (10, 4, Cursor(0, 0), 0), (10, 4, Cursor(0, 0), 2), (10, 4, Cursor(0, 0), 3), (10, 4, Cursor(0, 8), 1),
    (10, 4, Cursor(2, 4), 10), (12, 4, Cursor(0, 0), 7), (7, 7, Cursor(3, 0), 5), (5, 8, Cursor(0, 0), 4),
])
def test_advance_by_equals_advancing_one_batch_at_a_time(n: int, batch: int, start: Cursor, batches: int) -> None:
    order = GlobalOrder(n, batch, seed=0)
    stepped = start
    for _ in range(batches):
        stepped = order.advance(stepped)
    assert order.advance_by(start, batches) == stepped


def test_global_batch_len_counts_the_partial_batch_at_an_epoch_end() -> None:
    [s] = _samplers(10, 4, 1)
    assert [s.global_batch_len(step) for step in range(1, 8)] == [4, 4, 2, 4, 4, 2, 4]


def test_a_snapshot_of_another_dataset_or_seed_is_refused() -> None:
    [s] = _samplers(100, 10, 1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="num_samples=100, this one 99"):
        ResumableSampler(99, 10, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7, this one 8"):
        ResumableSampler(100, 10, seed=8).load_state_dict(state)
    lenient = ResumableSampler(50, 10, seed=8, strict=False)  # a change accepted: from the cursor, in the new order
    s.consumed(7)
    lenient.load_state_dict(s.state_dict())
    assert lenient.cursor == Cursor(1, 0) and lenient.step == 7


def test_a_dataloader_with_its_own_generator_leaves_the_global_stream_alone() -> None:
    """Why the README's loop passes `generator=torch.Generator()`: without it, creating the iterator
    draws from the global generator, and a resumed run's dropout masks shift by one draw."""
    [s] = _samplers(32, 8, 1)
    for generator, moves in ((None, True), (torch.Generator(), False)):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        iter(DataLoader(Ids(32), batch_sampler=s, generator=generator))
        assert (not torch.equal(before, torch.get_rng_state())) is moves


def test_iterating_is_endless_and_starts_at_the_consumed_position() -> None:
    [s] = _samplers(10, 4, 1)
    s.consumed(4)
    first = list(itertools.islice(iter(s), 3))
    order = GlobalOrder(10, 4, seed=7)
    cursor = order.advance_by(Cursor(), 4)
    want = []
    for _ in range(3):
        want.append(order.batch_at(cursor).tolist())
        cursor = order.advance(cursor)
    assert first == want
