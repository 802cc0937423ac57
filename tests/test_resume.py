"""Resume equivalence: N steps straight equal k steps, new processes, restore, N-k steps; bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks
from tests.workloads import train

N, K = 24, 10  # K falls mid-epoch (15 steps per epoch), so the restored cursor is mid-epoch too


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}/{k} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert torch.equal(a["rng"], b["rng"]), "the rank's torch generator differs"


@pytest.mark.parametrize("world", [1, 2])
def test_resumed_run_equals_the_uninterrupted_run_bitwise(tmp_path: Path, world: int) -> None:
    every = [f"snapshot.every_steps={K}", "train.seed=5"]
    straight = run_ranks(train, world, str(tmp_path / "straight"), [f"train.steps={N}", *every])
    first = run_ranks(train, world, str(tmp_path / "split"), [f"train.steps={K}", *every])
    second = run_ranks(train, world, str(tmp_path / "split"), [f"train.steps={N}", *every])
    for rank in range(world):
        assert second[rank]["resumed_from"] == K
        _assert_same_state(straight[rank], second[rank])
        seen = {**first[rank]["ledger"], **second[rank]["ledger"]}
        assert seen == straight[rank]["ledger"], "the resumed run read other samples"
        assert sorted(seen) == list(range(N))


def test_extending_a_finished_run_trains_only_the_new_steps(tmp_path: Path) -> None:
    run_ranks(train, 1, str(tmp_path), ["train.steps=8", "snapshot.every_steps=4"])
    extended = run_ranks(train, 1, str(tmp_path), ["train.steps=12", "snapshot.every_steps=4"])
    assert extended[0]["resumed_from"] == 8
    assert sorted(extended[0]["ledger"]) == [8, 9, 10, 11]
