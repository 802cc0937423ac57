"""Snapshots written and restored by real processes: content, consistency, failures, corruption."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dtrain.dist import solo_context
from dtrain.errors import CorruptSnapshotError, SnapshotError
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.staging import ForkedWriter
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage
from tests.distributed import run_ranks
from tests.workloads import restore_in_place, save_one_step_twice, train, train_with_failing_rank


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64, generator=g)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


@pytest.mark.parametrize("staging", ["copy", "fork"])
def test_snapshot_holds_its_step_although_training_changes_the_state_right_after(tmp_path: Path, staging: str) -> None:
    live = _state(0)
    expected = {k: v.clone() for k, v in live["model"].state_dict().items()}
    writer = SnapshotWriter(LocalStorage(tmp_path), solo_context(), file_bytes=16 << 10, staging=staging)
    pending = writer.save(7, {"model": live["model"].state_dict(), "optimizer": live["optimizer"].state_dict()},
                          {"rng": {"torch": torch.get_rng_state()}}, SnapshotMeta({"step": 7}))
    with torch.no_grad():  # training goes on the moment the stall ends
        for p in live["model"].parameters():
            p.mul_(-3.0).add_(1.0)
    pending.wait()
    for k, p in live["model"].state_dict().items():  # the writer gave up pages, the trainer lost none
        assert torch.equal(p, expected[k] * -3.0 + 1.0), k
    restored = reader.restore(LocalStorage(tmp_path), 7)
    assert restored.objects["model"].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(restored.objects["model"][k], v), k
    assert len(restored.manifest.files) > 2  # the 16 KiB file size forced several shard files


def test_optimizer_state_round_trips_exactly(tmp_path: Path) -> None:
    live = _state(1)
    SnapshotWriter(LocalStorage(tmp_path), solo_context()).save(
        3, {"optimizer": live["optimizer"].state_dict()}, {}).wait()
    got = reader.restore(LocalStorage(tmp_path), 3).objects["optimizer"]
    want = live["optimizer"].state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])  # key order too: callers walk these dicts in order
    for i, s in want["state"].items():
        assert list(got["state"][i]) == list(s)
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v)
    fresh = _state(2)["optimizer"]
    fresh.load_state_dict(got)  # the restored dict is accepted by a real optimizer


@pytest.mark.parametrize("world", [2, 3])
def test_replicated_state_is_written_once_spread_over_ranks(tmp_path: Path, world: int) -> None:
    results = run_ranks(train, world, str(tmp_path), ["train.steps=6", "snapshot.every_steps=6",
                                                      "snapshot.file_mb=1", "task.options.hidden=512"])
    assert all(r["error"] is None for r in results)
    m = catalog.read_manifest(LocalStorage(tmp_path), 6)
    assert m.world_size == world
    replicated = {n: f for n, f in m.files.items() if n.startswith("replicated-")}
    writers = {f.writer for f in replicated.values()}
    assert writers == set(range(world))
    model_bytes = sum(e.nbytes for k, e in m.tensors.items() if k.startswith(("model/", "optimizer/")))
    assert sum(f.bytes for f in replicated.values()) == model_bytes  # once in total, not once per rank
    assert sorted(n for n in m.files if n.startswith("rank-")) == [f"rank-{r:05d}.bin" for r in range(world)]
    assert reader.verify(LocalStorage(tmp_path), 6) == []


@pytest.mark.parametrize("is_one_host", [True, False], ids=["every-rank-reads", "spread-and-broadcast"])
def test_restore_at_another_world_size_reads_into_the_live_tensors(tmp_path: Path, is_one_host: bool) -> None:
    run_ranks(train, 3, str(tmp_path), ["train.steps=6", "snapshot.every_steps=6", "snapshot.file_mb=1",
                                        "task.options.hidden=512"])
    _, expected = reader.read_tensors(LocalStorage(tmp_path), 6, "model/")
    results = run_ranks(restore_in_place, 2, str(tmp_path), 6, is_one_host)
    for r in results:
        assert r["in_place"], "a tensor was allocated although a live one of its shape was given"
        assert r["model"].keys() == {k.removeprefix("model/") for k in expected}
        for k, v in expected.items():
            assert torch.equal(r["model"][k.removeprefix("model/")], v), k


def test_storage_failure_on_one_rank_commits_nothing_and_keeps_the_previous(tmp_path: Path) -> None:
    overrides = ["train.steps=30", "snapshot.every_steps=10", "snapshot.max_consecutive_failures=1"]
    results = run_ranks(train_with_failing_rank, 2, str(tmp_path), overrides, 1, 20)
    for r in results:  # every rank learns of the failure, and they stop together
        assert r["error"] is not None and "rank 1" in r["error"] and "No space left" in r["error"], r["error"]
    storage = LocalStorage(tmp_path)
    assert catalog.committed_steps(storage) == [10]
    assert reader.verify(storage, 10) == []
    assert storage.listdir(layout.PENDING) == []  # the partial save was cleaned up
    assert storage.path(layout.LATEST).read_text().strip() == "step_000000010"


def test_failed_save_is_retried_at_the_next_snapshot(tmp_path: Path) -> None:
    overrides = ["train.steps=30", "snapshot.every_steps=10", "snapshot.max_consecutive_failures=2"]
    results = run_ranks(train_with_failing_rank, 2, str(tmp_path), overrides, 0, 20)
    assert all(r["error"] is None for r in results)
    assert catalog.committed_steps(LocalStorage(tmp_path)) == [10, 30]


def _two_snapshots(tmp_path: Path) -> tuple[LocalStorage, list[dict]]:
    results = run_ranks(train, 2, str(tmp_path), ["train.steps=20", "snapshot.every_steps=10"])
    storage = LocalStorage(tmp_path)
    assert catalog.committed_steps(storage) == [10, 20]
    return storage, results


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flip": lambda p: _flip_byte(p, 12345),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "delete": lambda p: p.unlink(),
    "append": lambda p: p.write_bytes(p.read_bytes() + b"x"),
}


@pytest.mark.parametrize("how, victim", [("flip", "replicated-00000.bin"), ("delete", "rank-00001.bin")])
def test_corruption_is_named_and_resume_falls_back(tmp_path: Path, how: str, victim: str) -> None:
    storage, first = _two_snapshots(tmp_path)
    bad = storage.path(layout.committed_path(20)) / victim
    CORRUPTIONS[how](bad)
    problems = reader.verify(storage, 20)
    assert len(problems) == 1 and victim in problems[0]
    results = run_ranks(train, 2, str(tmp_path), ["train.steps=20", "snapshot.every_steps=10"])
    assert [r["resumed_from"] for r in results] == [10, 10]
    assert reader.verify(storage, 20) == []  # step 20 was trained again and re-committed
    for before, after in zip(first, results, strict=True):  # the bad bytes read into the live model left no trace
        for k, v in before["model"].items():
            assert torch.equal(after["model"][k], v), k


def test_a_run_whose_every_snapshot_is_corrupt_refuses_to_start_over(tmp_path: Path) -> None:
    storage, _ = _two_snapshots(tmp_path)
    for step in (10, 20):
        _flip_byte(storage.path(layout.committed_path(step)) / "replicated-00000.bin", 777)
    results = run_ranks(train, 2, str(tmp_path), ["train.steps=30", "snapshot.every_steps=10"])
    for r in results:
        assert r["error"] is not None and "none of the 2 committed snapshots" in r["error"]
        assert "step_000000010/replicated-00000.bin" in r["error"]
    assert catalog.committed_steps(storage) == [10, 20]  # nothing was trained over them


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_each_corruption_is_detected_by_name(tmp_path: Path, how: str) -> None:
    live = _state(3)
    storage = LocalStorage(tmp_path)
    SnapshotWriter(storage, solo_context()).save(5, {"model": live["model"].state_dict()}, {"rng": {"x": torch.ones(3)}}).wait()
    victim = storage.path(layout.committed_path(5)) / "replicated-00000.bin"
    CORRUPTIONS[how](victim)
    problems = reader.verify(storage, 5)
    assert len(problems) == 1 and "replicated-00000.bin" in problems[0]
    with pytest.raises(CorruptSnapshotError, match="replicated-00000.bin"):
        reader.restore(storage, 5)


def test_fork_staging_returns_once_the_held_bytes_fit_the_budget() -> None:
    chunks, budget = 20, 5

    def work(wrote):
        for _ in range(chunks):
            time.sleep(0.02)
            wrote(1)
        return {"error": None}

    child = ForkedWriter(work, held_bytes=chunks, budget_bytes=budget)
    assert child.held_bytes() <= budget
    assert child.wait() == {"error": None}


def test_a_writer_process_that_dies_is_reported_not_waited_for() -> None:
    child = ForkedWriter(lambda wrote: os.kill(os.getpid(), signal.SIGKILL), held_bytes=1)
    with pytest.raises(SnapshotError, match="killed by SIGKILL"):
        child.wait()


def test_an_error_in_the_writer_process_comes_back_as_its_report() -> None:
    def work(wrote):
        raise OSError(28, "No space left on device")

    report = ForkedWriter(work, held_bytes=1).wait()
    assert "No space left on device" in report["error"]


def test_a_step_saved_again_by_the_same_writer_commits_on_every_rank(tmp_path: Path) -> None:
    """Each save's messages have keys of their own: the second save of a step never reads, nor
    deletes, the first one's outcome (rank 0 once deleted the outcome it had just published, and
    the other ranks failed the save at its deadline)."""
    assert len(run_ranks(save_one_step_twice, 2, str(tmp_path / "a"), str(tmp_path / "b"), timeout=120)) == 2
    _, tensors = reader.read_tensors(LocalStorage(tmp_path / "b"), 1, "model/")
    assert torch.equal(tensors["model/w"], torch.full((1000,), 2.0))
