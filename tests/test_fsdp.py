"""Sharded state (FSDP2): each rank writes its own rows once, and restore reads on any world size
exactly the rows each rank holds, under FSDP or DDP, whichever saved it.

Real processes on gloo; the model (tests/fsdp_workloads.py) has a tied embedding and head, layers
no world size here divides evenly, and a replicated integer buffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtrain.snapshot import checksum, layout
from tests.conftest import dtrain_cmd, run
from tests.distributed import run_ranks
from tests.fsdp_workloads import restore_expecting_error, restore_sharded, save_sharded

STEP = 3
MiB = 1 << 20


def _snapshot_dir(run_dir: Path) -> Path:
    return run_dir / layout.committed_path(STEP)


def _state_bytes(full: dict[str, torch.Tensor]) -> int:
    """The state's bytes with the tied head counted once (it is the embedding)."""
    return sum(t.numel() * t.element_size() for k, t in full.items() if k != "model/head.weight")


def _assert_equal(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(expected) == sorted(got), f"{what}: other keys"
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), f"{what}: {key} differs"


def test_each_rank_writes_its_rows_once_and_any_world_size_restores_them(tmp_path: Path) -> None:
    saved = run_ranks(save_sharded, 2, str(tmp_path), STEP)
    files = {f.name: f.stat().st_size for f in _snapshot_dir(tmp_path).iterdir() if f.name != layout.MANIFEST}
    state = _state_bytes(saved[0]["full"])
    written = sum(files.values()) - sum(n for name, n in files.items() if name.startswith("rank-"))
    assert state <= written <= state + 4096, f"{written} bytes written for a {state}-byte state: not 1x"
    assert {n for n in files if n.startswith("shard-")} == {"shard-00000-00000.bin", "shard-00001-00000.bin"}
    for world in (1, 2, 3):
        for rank, got in enumerate(run_ranks(restore_sharded, world, str(tmp_path), STEP)):
            _assert_equal(saved[0]["full"], got["full"], f"restored on rank {rank} of {world}")
            assert got["tied"] and got["restored_is_dtensor"], "the tie or the sharded optimizer state was lost"


@pytest.mark.parametrize(("saved_sharded", "saved_world", "restored_sharded", "restored_world"),
                         [(False, 2, True, 3), (True, 2, False, 1)])
def test_a_replicated_snapshot_restores_sharded_and_the_reverse(tmp_path: Path, saved_sharded: bool, saved_world: int,
                                                                restored_sharded: bool, restored_world: int) -> None:
    saved = run_ranks(save_sharded, saved_world, str(tmp_path), STEP, saved_sharded)
    for got in run_ranks(restore_sharded, restored_world, str(tmp_path), STEP, restored_sharded):
        _assert_equal(saved[0]["full"], got["full"], "across strategies")
        assert got["tied"]


def test_save_and_restore_hold_no_more_than_a_shard_and_a_file_buffer(tmp_path: Path) -> None:
    """A 150 MB state over 3 ranks: saving stages each rank's 50 MB shard (copy staging) and nothing
    whole; restoring on 2 ranks reads into the live shards through at most one 4 MiB piece buffer."""
    sizes = {"vocab": 16384, "width": 512, "hidden": 4099}
    saved = run_ranks(save_sharded, 3, str(tmp_path), STEP, True, 4, sizes)
    state = _state_bytes(saved[0]["full"])
    for r in saved:
        assert r["local"] < state / 2, "the test needs shards well below the whole state"
        assert r["peak"] <= r["local"] + 4 * MiB + 24 * MiB, (
            f"rank {r['rank']} grew by {r['peak'] / MiB:.0f} MiB saving a {r['local'] / MiB:.0f} MiB shard")
    for rank, r in enumerate(run_ranks(restore_sharded, 2, str(tmp_path), STEP, True, sizes)):
        assert r["peak"] <= 4 * MiB + 24 * MiB, (
            f"rank {rank} grew by {r['peak'] / MiB:.0f} MiB restoring into its {r['local'] / MiB:.0f} MiB shard")
        _assert_equal(saved[0]["full"], r["full"], "after resharding 3 -> 2")


def test_a_flipped_byte_in_a_shard_is_named_by_resharding_restore_and_by_verify(tmp_path: Path) -> None:
    run_ranks(save_sharded, 2, str(tmp_path), STEP)
    shard = _snapshot_dir(tmp_path) / "shard-00001-00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    for error in run_ranks(restore_expecting_error, 3, str(tmp_path), STEP):
        assert "shard-00001-00000.bin" in error and "checksum mismatch" in error, error
    done = run(dtrain_cmd("ckpt", "verify", str(tmp_path)))
    assert done.returncode == 1 and "shard-00001-00000.bin" in done.stdout, done.stdout


def test_a_version_2_snapshot_restores_sharded_through_whole_file_checks(tmp_path: Path) -> None:
    """Snapshots written before pieces had checksums: a rank that needs part of a file reads it
    whole to check it, then keeps its rows."""
    saved = run_ranks(save_sharded, 2, str(tmp_path), STEP, False)
    path = _snapshot_dir(tmp_path) / layout.MANIFEST
    body = json.loads(path.read_bytes().partition(b"\n")[2])
    body["version"] = 2
    for entry in body["tensors"].values():
        for piece in entry["pieces"]:
            del piece["crc32c"]
    text = json.dumps(body).encode()
    crc = checksum.extend(0, memoryview(text))
    path.write_bytes(f"dtrain-snapshot 2 crc32c={crc:08x} bytes={len(text)}\n".encode() + text)
    for got in run_ranks(restore_sharded, 3, str(tmp_path), STEP, True):
        _assert_equal(saved[0]["full"], got["full"], "a version 2 snapshot")


def test_show_names_the_layout_and_export_streams_the_whole_model(tmp_path: Path) -> None:
    saved = run_ranks(save_sharded, 2, str(tmp_path / "run"), STEP)
    shown = run(dtrain_cmd("ckpt", "show", str(tmp_path / "run")))
    assert shown.returncode == 0, shown.stdout
    assert "model/up.weight" in shown.stdout and "0: 0-385  1: 385-769" in shown.stdout, shown.stdout
    out = tmp_path / "model.safetensors"
    done = run(dtrain_cmd("ckpt", "export", str(tmp_path / "run"), "--out", str(out)))
    assert done.returncode == 0, done.stdout
    from safetensors.torch import load_file

    weights = load_file(str(out))
    model = {k.removeprefix("model/"): v for k, v in saved[0]["full"].items() if k.startswith("model/")}
    assert sorted(weights) == sorted(model)
    for name, tensor in model.items():
        assert torch.equal(weights[name], tensor), name
    again = tmp_path / "again.safetensors"
    assert run(dtrain_cmd("ckpt", "export", str(tmp_path / "run"), "--out", str(again))).returncode == 0
    assert again.read_bytes() == out.read_bytes(), "equal weights must export to equal bytes"
