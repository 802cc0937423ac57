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


@pytest.mark.parametrize("mtbf, many", [(1e9, False), (1e-6, True)])
def test_auto_interval_is_agreed_by_both_ranks_and_follows_the_mtbf(tmp_path: Path, mtbf: float, many: bool) -> None:
    """Each rank measures its own save cost; the group saves when either finds a save due. A huge
    MTBF leaves only the bootstrap save and the end of the run; a tiny one saves as often as a
    write allows. Either way the ranks stay in lockstep and the run resumes bit for bit."""
    auto = ['snapshot.every_steps="auto"', f"snapshot.mtbf_seconds={mtbf}", "snapshot.at_epoch_end=false",
            "snapshot.keep_last=1000", "train.seed=3"]
    straight = run_ranks(train, 2, str(tmp_path / "straight"), ["train.steps=40", *auto])
    first = run_ranks(train, 2, str(tmp_path / "split"), ["train.steps=30", *auto])
    committed = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "split" / "snapshots").glob("step_*"))
    if many:
        assert committed[0] == 10 and len(committed) >= 3, committed  # saves between the bootstrap and the end
    else:
        assert committed == [10, 30]
    second = run_ranks(train, 2, str(tmp_path / "split"), ["train.steps=40", *auto])
    for rank in range(2):
        assert first[rank]["error"] is None and second[rank]["resumed_from"] == 30
        _assert_same_state(straight[rank], second[rank])
