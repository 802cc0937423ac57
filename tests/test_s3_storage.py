"""S3Storage against a real SeaweedFS server: the conditional commit, multipart uploads, ranged
reads, listing, cleanup of unfinished uploads, and a whole snapshot saved, verified and restored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dtrain.config import SnapshotConfig
from dtrain.dist import solo_context
from dtrain.errors import ConfigError
from dtrain.snapshot import catalog, layout, reader
from dtrain.snapshot.manager import SnapshotManager
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import CommitConflictError, parse_run_dir
from dtrain.storage.s3 import S3Storage
from support.seaweed import SeaweedServer

BUCKET = "dtrain-unit"
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("weed") / "data") as s:
        s.create_bucket(BUCKET)
        yield s


@pytest.fixture
def storage(server: SeaweedServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return S3Storage(BUCKET, f"unit/{request.node.name}", part_bytes=5 * MiB, concurrency=3)


def _write(storage: S3Storage, path: str, data: bytes) -> None:
    handle = storage.open_write(path)
    for start in range(0, len(data), 3 * MiB + 17):  # writes that straddle part boundaries
        handle.write(memoryview(data)[start:start + 3 * MiB + 17])
    handle.close()


def test_a_large_file_goes_up_in_parts_and_comes_back_through_ranged_reads(storage: S3Storage) -> None:
    data = os.urandom(13 * MiB + 5)
    _write(storage, "snapshots/step_000000001/replicated-00000.bin", data)
    head = storage.client.head_object(Bucket=BUCKET, Key=storage.key("snapshots/step_000000001/replicated-00000.bin"))
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    sizes = [1, 4 * MiB, 0, 7 * MiB + 3, 2 * MiB]  # segments that cut across the ranges
    outs = [bytearray(n) for n in sizes]
    seen: list[int] = []
    storage.read_into("snapshots/step_000000001/replicated-00000.bin", [memoryview(o) for o in outs],
                      lambda out: seen.append(len(out)))
    assert b"".join(outs) == data[:sum(sizes)]
    assert seen == sizes  # reported once each, in file order, whatever order the ranges arrived in


def test_a_small_file_is_one_put_and_reads_back(storage: S3Storage) -> None:
    _write(storage, "a/small.bin", b"0123456789")
    assert storage.size("a/small.bin") == 10
    assert storage.read_bytes("a/small.bin", 10) == b"0123456789"
    with pytest.raises(ValueError, match="over the 9-byte limit"):
        storage.read_bytes("a/small.bin", 9)
    with pytest.raises(EOFError):
        storage.read_into("a/small.bin", [memoryview(bytearray(11))])
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.size("a/missing.bin")


def test_the_commit_refuses_a_second_writer_of_the_same_step(storage: S3Storage) -> None:
    final = layout.committed_path(7)
    storage.commit(final, final, layout.MANIFEST, b"first writer")
    with pytest.raises(CommitConflictError, match="committed already"):
        storage.commit(final, final, layout.MANIFEST, b"second writer")
    assert storage.read_bytes(f"{final}/{layout.MANIFEST}", 100) == b"first writer"


def test_listing_exists_and_deletion_manifest_first(storage: S3Storage) -> None:
    for name in ["snapshots/step_000000001/manifest.json", "snapshots/step_000000001/rank-00000.bin",
                 "snapshots/step_000000002/rank-00000.bin", "snapshots/latest"]:
        storage.write_atomic(name, b"x")
    assert storage.listdir("snapshots") == ["latest", "step_000000001", "step_000000002"]
    assert storage.listdir("snapshots/step_000000001") == ["manifest.json", "rank-00000.bin"]
    assert storage.listdir("missing") == []
    assert storage.exists("snapshots/step_000000002") and not storage.is_regular_file("snapshots/step_000000002")
    assert catalog.committed_steps(storage) == [1]
    assert catalog.uncommitted_step_dirs(storage) == ["step_000000002"]
    remains = storage.uncommit("snapshots/step_000000001", "ignored", layout.MANIFEST)
    assert catalog.committed_steps(storage) == []  # invisible at once: its manifest went first
    storage.remove_tree(remains)
    assert storage.listdir("snapshots") == ["latest", "step_000000002"]


def test_unfinished_multipart_uploads_are_aborted(storage: S3Storage) -> None:
    handle = storage.open_write("snapshots/step_000000003/replicated-00000.bin")
    handle.write(memoryview(os.urandom(6 * MiB)))  # one part sent; the writer is "killed" before close
    key = storage.key("snapshots/step_000000003/replicated-00000.bin")
    uploads = storage.client.list_multipart_uploads(Bucket=BUCKET, Prefix=storage.key("snapshots")).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [key]
    assert storage.remove_temp_files("snapshots") == ["step_000000003/replicated-00000.bin"]
    assert not storage.client.list_multipart_uploads(Bucket=BUCKET, Prefix=storage.key("snapshots")).get("Uploads")
    assert not storage.exists("snapshots/step_000000003/replicated-00000.bin")


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1500, 1100, generator=g), "b": torch.randn(7, generator=g)}


def test_a_snapshot_saves_verifies_and_restores_through_s3(storage: S3Storage) -> None:
    writer = SnapshotWriter(storage, solo_context(), file_bytes=4 * MiB)
    for step in (10, 20):
        result = writer.save(step, {"model": _state(step)}, {}).wait()
        assert result.path == layout.committed_path(step)
    assert catalog.committed_steps(storage) == [10, 20]
    assert storage.read_bytes(layout.LATEST, 100) == b"step_000000020\n"
    assert reader.verify(storage, 20) == []
    restored = reader.restore(storage, 20)
    assert all(torch.equal(restored.objects["model"][k], v) for k, v in _state(20).items())

    victim = f"{layout.committed_path(20)}/replicated-00001.bin"
    data = bytearray(storage.read_bytes(victim, 64 * MiB))
    data[12345] ^= 0x01
    storage.write_atomic(victim, bytes(data))
    problems = reader.verify(storage, 20)
    assert len(problems) == 1 and "replicated-00001.bin: checksum mismatch" in problems[0]

    manager = SnapshotManager(storage, SnapshotConfig(), solo_context())
    restored = manager.restore_latest()  # the corrupt newest is skipped, named in the log
    assert restored is not None and restored.manifest.step == 10


def test_start_removes_uncommitted_files_and_unfinished_uploads(storage: S3Storage) -> None:
    SnapshotWriter(storage, solo_context()).save(5, {"model": _state(5)}, {}).wait()
    storage.write_atomic("snapshots/step_000000006/replicated-00000.bin", b"a save killed before its commit")
    storage.open_write("snapshots/step_000000006/rank-00000.bin").write(memoryview(bytes(6 * MiB)))
    SnapshotManager(storage, SnapshotConfig(), solo_context()).prepare_run_dir()
    assert storage.listdir("snapshots") == ["latest", "step_000000005"]
    assert not storage.client.list_multipart_uploads(Bucket=BUCKET, Prefix=storage.key("")).get("Uploads")


def test_retention_deletes_the_manifest_first(storage: S3Storage) -> None:
    writer = SnapshotWriter(storage, solo_context())
    for step in (1, 2, 3):
        writer.save(step, {"model": _state(step)}, {}).wait()
    deleted = catalog.prune(storage, SnapshotConfig(keep_last=1))
    assert deleted == [1, 2]
    assert storage.listdir("snapshots") == ["latest", "step_000000003"]


@pytest.mark.parametrize(("text", "expected"), [
    ("runs/x", ("runs/x", True)),
    ("/abs/runs/x", ("/abs/runs/x", True)),
    ("file:///abs/runs/x", ("/abs/runs/x", True)),
    ("s3://bucket-1/runs/x", ("s3://bucket-1/runs/x", False)),
    ("s3://bucket-1/runs/x/", ("s3://bucket-1/runs/x", False)),
    ("C:/runs", ("C:/runs", True)),
])
def test_run_dirs_that_parse(text: str, expected: tuple[str, bool]) -> None:
    location = parse_run_dir(text)
    assert (location.url, location.is_local) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("gs://bucket/run", "the scheme gs: is not supported; pass a local path, file:///PATH or s3://BUCKET/PREFIX"),
    ("hdfs://namenode/run", "the scheme hdfs: is not supported"),
    ("S3A://bucket/run", "the scheme s3a: is not supported"),
    ("s3://bucket", "name the run's prefix inside the bucket"),
    ("s3://bucket/a/../b", "without empty, '.' or '..' parts"),
    ("s3://Bad_Bucket/run", "is not an S3 bucket name"),
    ("file://relative/run", "needs an absolute path"),
])
def test_run_dirs_that_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_run_dir(text)
    assert text in str(refused.value) and message in str(refused.value)


def test_a_local_run_keeps_its_lock_and_metrics_in_the_run_dir_a_bucket_run_in_a_local_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert parse_run_dir("runs/x").local_dir() == Path("runs/x")
    monkeypatch.setenv("DTRAIN_LOCAL_DIR", str(tmp_path))
    assert parse_run_dir("s3://bkt/a/b").local_dir() == tmp_path / "bkt" / "a" / "b"


@pytest.mark.parametrize("argv", [
    ["train", "--check", "--run-dir", "gs://bucket/run"],
    ["ckpt", "list", "hdfs://namenode/run"],
    ["ckpt", "verify", "gs://bucket/run/snapshots/step_000000010"],
])
def test_the_command_line_refuses_unsupported_schemes_with_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    from dtrain.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not supported; pass a local path, file:///PATH or s3://BUCKET/PREFIX" in err


def test_train_check_names_a_missing_bucket(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dtrain.cli import main

    for name, value in {**server.env(), "DTRAIN_LOCAL_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--check", "--run-dir", "s3://no-such-bucket/run"]) == 2
    assert "--run-dir s3://no-such-bucket/run: s3://no-such-bucket: " in capsys.readouterr().err
    assert main(["train", "--check", "--run-dir", f"s3://{BUCKET}/run"]) == 0


def test_a_loop_of_your_own_snapshots_to_a_bucket_by_url(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    import dtrain

    for name, value in {**server.env(), "DTRAIN_LOCAL_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{BUCKET}/own-loop"
    weights = torch.nn.Linear(8, 4)
    snap = dtrain.Snapshotter(url, every_steps=2, keep_last=2)
    assert snap.restore({"model": weights}) == 0
    for step in range(1, 6):
        with torch.no_grad():
            weights.weight.add_(1.0)
        snap.step(step, {"model": weights})
    snap.close(5, {"model": weights})
    assert (tmp_path / BUCKET / "own-loop" / ".lock").is_file()  # the lock is local; the snapshots are not
    assert not list(tmp_path.rglob("step_*"))
    again = torch.nn.Linear(8, 4)
    resumed = dtrain.Snapshotter(url, every_steps=2, keep_last=2)
    assert resumed.restore({"model": again}) == 5
    resumed.close(5, {"model": again})
    assert torch.equal(again.weight, weights.weight)
    assert catalog.committed_steps(S3Storage(BUCKET, "own-loop")) == [4, 5]


def test_a_commit_whose_retry_meets_its_own_manifest_is_committed(storage: S3Storage) -> None:
    """A PUT that landed but whose response was lost is retried, and the retry meets 412."""
    final = layout.committed_path(8)
    storage.write_atomic(f"{final}/{layout.MANIFEST}", b"this writer's manifest")
    storage.commit(final, final, layout.MANIFEST, b"this writer's manifest")  # no CommitConflictError


def test_ckpt_commands_take_a_bucket_url(storage: S3Storage, capsys: pytest.CaptureFixture) -> None:
    import json

    from dtrain.cli import main

    writer = SnapshotWriter(storage, solo_context())
    for step in (1, 2, 3):
        writer.save(step, {"model": _state(step)}, {}, SnapshotMeta(config={"snapshot": {"keep_last": 1}})).wait()
    url = storage.describe()
    assert main(["ckpt", "list", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["path"] == f"{url}/snapshots/step_000000001"
    assert main(["ckpt", "show", f"{url}/snapshots/step_000000002"]) == 0
    assert "step         2" in capsys.readouterr().out
    assert main(["ckpt", "verify", url]) == 0
    assert main(["ckpt", "prune", url]) == 0
    assert "deleted 2 snapshot(s): [1, 2]" in capsys.readouterr().out
    assert catalog.committed_steps(storage) == [3]
    assert main(["ckpt", "show", f"{url}/snapshots/step_000000001"]) == 1  # pruned: no such snapshot
