from __future__ import annotations

import pytest
import torch

from dtrain.data import Cursor, GlobalOrder, collate, rank_share, share_bounds
from dtrain.examples.teacher import build_datasets


@pytest.mark.parametrize(
    "batch, world, bounds",
    [
        (8, 2, [(0, 4), (4, 8)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (2, 3, [(0, 1), (1, 2), (2, 2)]),  # the last partial batch can leave a rank empty
        (5, 1, [(0, 5)]),
        (0, 2, [(0, 0), (0, 0)]),
    ],
)
def test_share_bounds(batch: int, world: int, bounds: list[tuple[int, int]]) -> None:
    assert [share_bounds(batch, r, world) for r in range(world)] == bounds


@pytest.mark.parametrize("n, batch", [(10, 4), (12, 4), (7, 7), (5, 8), (1, 1)])
def test_an_epoch_reads_every_sample_once(n: int, batch: int) -> None:
    order, cursor, seen, steps = GlobalOrder(n, batch, seed=3), Cursor(), [], 0
    while cursor.epoch == 0:
        seen += order.batch_at(cursor).tolist()
        cursor = order.advance(cursor)
        steps += 1
    assert sorted(seen) == list(range(n))
    assert steps == order.steps_per_epoch()
    assert cursor == Cursor(1, 0)


def test_epochs_are_shuffled_differently_and_reproducibly() -> None:
    a, b = GlobalOrder(100, 10, seed=1), GlobalOrder(100, 10, seed=1)
    assert torch.equal(a.permutation(0), b.permutation(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), GlobalOrder(100, 10, seed=2).permutation(0))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_partition_the_global_batch_on_any_world_size(world: int) -> None:
    batch = GlobalOrder(50, 13, seed=0).batch_at(Cursor(0, 39))  # the last, partial batch: 11 samples
    shares = [rank_share(batch, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shares), batch)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_cursor_outside_the_epoch_is_refused() -> None:
    with pytest.raises(ValueError, match="outside an epoch"):
        GlobalOrder(10, 4, seed=0).batch_at(Cursor(0, 10))


def test_collate_uses_batched_fetch_and_handles_an_empty_share() -> None:
    train, _ = build_datasets({"num_samples": 20, "eval_samples": 4})
    x, y = collate(train, torch.tensor([3, 1]))
    assert torch.equal(x, torch.stack([train[3][0], train[1][0]]))
    empty_x, empty_y = collate(train, torch.tensor([], dtype=torch.long))
    assert empty_x.shape == (0, x.shape[1]) and empty_y.shape == (0,)
