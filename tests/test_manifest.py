"""The manifest is parsed as hostile input: plain file names only, plausible and consistent sizes,
nothing executed or unpickled. Checked on documents and on real snapshots altered on disk."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dtrain.dist import solo_context
from dtrain.errors import CorruptSnapshotError, UnsafeSnapshotError
from dtrain.snapshot import catalog, checksum, layout, reader
from dtrain.snapshot.manifest import FileEntry, Manifest, Piece, TensorEntry, with_header
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage
from tests.conftest import dtrain_cmd, run

WHERE = "runs/x/snapshots/step_000000007/manifest.json"


def _manifest() -> Manifest:
    return Manifest(
        step=7, world_size=2, created_unix=1_700_000_000.5,
        progress={"step": 7, "cursor": {"epoch": 1, "offset": 12}}, metrics={"val_loss": 0.25},
        config={"train": {"steps": 10}}, versions={"torch": "2.x"},
        objects={"model": {"w": {"__tensor__": "model/w"}, "b": {"__tensor__": "model/b"}},
                 "optimizer": {"state": {"__dict__": [[0, {"step": 3}]]}, "betas": {"__tuple__": [0.9, 0.99]}}},
        per_rank=[{"rng": {"torch": {"__tensor__": "rank00000/rng/torch"}}},
                  {"rng": {"torch": {"__tensor__": "rank00001/rng/torch"}}}],
        tensors={
            "model/w": TensorEntry("float32", [2, 3], [Piece("replicated-00000.bin", 0, 0, 16, 0x1111),
                                                       Piece("replicated-00001.bin", 0, 16, 8, 0x2222)]),
            "model/b": TensorEntry("bfloat16", [2], [Piece("replicated-00001.bin", 8, 0, 4, 0x3333)]),
            "model/empty": TensorEntry("int64", [0, 5], [Piece("replicated-00001.bin", 12, 0, 0, 0)]),
            "rank00000/rng/torch": TensorEntry("uint8", [4], [Piece("rank-00000.bin", 0, 0, 4, 0x4444)]),
            "rank00001/rng/torch": TensorEntry("uint8", [4], [Piece("rank-00001.bin", 0, 0, 4, 0x4444)]),
        },
        files={
            "replicated-00000.bin": FileEntry(16, 0x1234ABCD, 0),
            "replicated-00001.bin": FileEntry(12, 0xFFFFFFFF, 1),
            "rank-00000.bin": FileEntry(4, 0, 0),
            "rank-00001.bin": FileEntry(4, 7, 1),
        },
    )


def _raw() -> dict[str, Any]:
    return json.loads(_manifest().to_json())


def _rename_file(raw: dict[str, Any], old: str, new: str) -> None:
    raw["files"][new] = raw["files"].pop(old)
    for t in raw["tensors"].values():
        for p in t["pieces"]:
            if p["file"] == old:
                p["file"] = new


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting raw[path[0]][path[1]]... to value."""

    def mutate(raw: dict[str, Any]) -> None:
        node: Any = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


def _piece(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of one piece of tensor model/w."""
    return _set("tensors", "model/w", "pieces", index, key, value=value)


def _replaced(old: str, new: str, count: int = 1) -> str:
    """The compact manifest JSON with `old` replaced by `new` (`count` times, -1 for all)."""
    text = _manifest().to_json()
    assert old in text, old
    return text.replace(old, new, count)


def _renamed(new: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: _rename_file(raw, "replicated-00001.bin", new)


# -- round trip -------------------------------------------------------------------------------------


def test_manifest_round_trips_through_json() -> None:
    m = _manifest()
    text = m.to_json()
    assert Manifest.from_json(text, WHERE) == m
    assert Manifest.from_json(text.encode(), WHERE) == m  # bytes as read from storage
    assert m.total_bytes == 36
    assert m.tensors["model/w"].nbytes == 24 and m.tensors["model/b"].nbytes == 4


def test_to_json_is_deterministic_and_strict_json_for_finite_values() -> None:
    text = _manifest().to_json()
    assert text == _manifest().to_json()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# -- hostile documents ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (_renamed("../../x"), "file name '../../x' is not a plain file name"),
        (_renamed("/etc/passwd"), "file name '/etc/passwd' is not a plain file name"),
        (_renamed("sub/x.bin"), "file name 'sub/x.bin' is not a plain file name"),
        (_renamed("..\\x.bin"), "is not a plain file name"),
        (_renamed(".."), "file name '..' is not a plain file name"),
        (_renamed(".hidden"), "file name '.hidden' is not a plain file name"),
        (_renamed(""), "file name '' is not a plain file name"),
        (_renamed("a" * 129), "is not a plain file name"),
        (_renamed("x\x00.bin"), "is not a plain file name"),
        (_piece(0, "file", "../../x"), "refers to unlisted file '../../x'"),
        (_set("files", "replicated-00000.bin", "bytes", value=1 << 60), f"claims {1 << 60} bytes"),
        (_set("files", "replicated-00000.bin", "bytes", value=-1), "file replicated-00000.bin claims -1 bytes"),
        (_set("files", "rank-00001.bin", "writer", value=2), "file rank-00001.bin has writer 2"),
        (_set("files", "rank-00001.bin", "writer", value=-1), "file rank-00001.bin has writer -1"),
        (_piece(1, "file_offset", 5), "tensor model/w reads past the end of replicated-00001.bin"),
        (_piece(0, "file_offset", -1), "tensor model/w reads past the end of replicated-00000.bin"),
        (_piece(1, "tensor_offset", 20), "tensor model/w has a gap or overlap at byte 16"),
        (_piece(1, "tensor_offset", 12), "tensor model/w has a gap or overlap at byte 16"),
        (_piece(0, "tensor_offset", 4), "tensor model/w has a gap or overlap at byte 0"),
        (_piece(1, "nbytes", -8), "tensor model/w has a gap or overlap at byte 16"),
        (_piece(1, "nbytes", 4), "tensor model/w pieces hold 20 bytes, its shape needs 24"),
        (_set("tensors", "model/w", "shape", value=[2, 2]), "tensor model/w pieces hold 24 bytes, its shape needs 16"),
        (_set("tensors", "model/w", "pieces", value=[]), "tensor model/w pieces hold 0 bytes, its shape needs 24"),
        (_set("tensors", "model/w", "dtype", value="float128"), "tensor model/w has unknown dtype 'float128'"),
        (_set("tensors", "model/w", "dtype", value="object"), "tensor model/w has unknown dtype 'object'"),
        (_set("tensors", "model/w", "shape", value=[-2, -3]), "tensor model/w has shape [-2, -3]"),
        (_set("tensors", "model/w", "shape", value=[1] * 65), "tensor model/w has shape"),
        (_set("tensors", "model/w", "shape", value=[1 << 40, 1 << 40]), "tensor model/w claims"),
        (_set("world_size", value=0), "world_size 0 is out of range"),
        (_set("world_size", value=-1), "world_size -1 is out of range"),
        (_set("world_size", value=3), "2 per-rank entries for world size 3"),
        (_set("per_rank", value=[{}]), "1 per-rank entries for world size 2"),
        (_set("step", value=-1), "step -1 is out of range"),
        (_set("format", value="pickle"), "format 'pickle'"),
        (_set("version", value=1), "version 1"),
        (_set("version", value="1"), "version '1'"),
        (lambda raw: raw.pop("format"), "format None"),
        (lambda raw: raw.pop("tensors"), "malformed (KeyError"),
        (_set("files", value=[]), "`files` must be an object"),
        (_set("tensors", value="all of them"), "`tensors` must be an object"),
        (_piece(0, "exec", "rm -rf /"), "malformed (TypeError"),
        (_set("files", "rank-00000.bin", "pickle", value=True), "malformed (TypeError"),
        (_set("files", "rank-00000.bin", value=4), "malformed (TypeError"),
        (_set("step", value="seven"), "malformed (TypeError"),
    ],
)
def test_hostile_manifest_is_refused_naming_the_problem(mutate: Callable[[dict[str, Any]], None], fragment: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(UnsafeSnapshotError) as info:
        Manifest.from_json(json.dumps(raw), WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.", "is not valid JSON"),  # a pickle
        (b"{\"format\": \"\xc3\x28\"}", "is not valid JSON"),  # not UTF-8
        (b"", "is not valid JSON"),
        ("{'format': 'dtrain-snapshot'}", "is not valid JSON"),
        (_manifest().to_json()[:-1], "is not valid JSON"),  # truncated
        ("[]", "malformed"),
        (json.dumps([_raw()]), "malformed"),
        ("null", "malformed"),
        ("42", "malformed"),
        ('"dtrain-snapshot"', "malformed"),
    ],
)
def test_a_document_that_is_not_a_manifest_object_is_refused(text: str | bytes, fragment: str) -> None:
    with pytest.raises(UnsafeSnapshotError) as info:
        Manifest.from_json(text, WHERE)
    assert str(info.value).startswith(WHERE) and fragment in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({**_raw(), "step": float("inf")}),
        json.dumps({**_raw(), "world_size": float("inf")}),
        _replaced('"nbytes":4', '"nbytes":"4"'),
        _replaced('"bytes":4', '"bytes":"4"'),
        _replaced('"file":"rank-00000.bin"', '"file":["rank-00000.bin"]'),
        _replaced('"crc32c":0', '"crc32c":"0"'),
        _replaced('"bytes":4', '"bytes":4.5'),
        _replaced('"file_offset":8', '"file_offset":true'),
        json.dumps({**_raw(), "per_rank": [[], []]}),
        _replaced('"metrics":{"val_loss":0.25}', '"metrics":' + "[" * 100_000 + "]" * 100_000),
        _replaced('"replicated-00000.bin"', '"replicated-00000.bin\\n"', -1),
    ],
    ids=["step-inf", "world-inf", "nbytes-str", "bytes-str", "file-list", "crc-str", "bytes-float", "offset-bool",
         "per-rank-lists", "deep-nesting", "name-trailing-newline"],
)
def test_a_manifest_with_values_of_the_wrong_type_is_refused(text: str) -> None:
    with pytest.raises(UnsafeSnapshotError, match=WHERE):
        Manifest.from_json(text, WHERE)


# -- hostile files in a real snapshot ------------------------------------------------------------

STEP = 5


def _save(root: Path) -> tuple[LocalStorage, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 2))
    storage = LocalStorage(root)
    progress = {"step": STEP, "samples_seen": 40, "cursor": {"epoch": 0, "offset": 40}}
    SnapshotWriter(storage, solo_context()).save(
        STEP, {"model": model.state_dict(), "progress": progress}, {"rng": {"torch": torch.get_rng_state()}},
        SnapshotMeta(progress, {"val_loss": 1.0})).wait()
    return storage, {k: v.clone() for k, v in model.state_dict().items()}


def _read_raw(snap: Path) -> dict[str, Any]:
    return json.loads((snap / layout.MANIFEST).read_bytes().partition(b"\n")[2])


def _write_raw(snap: Path, raw: dict[str, Any]) -> None:
    (snap / layout.MANIFEST).write_bytes(with_header(json.dumps(raw).encode()))


def _files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot_dir(storage: LocalStorage) -> Path:
    return storage.path(layout.committed_path(STEP))


def test_a_real_snapshot_restores_before_it_is_tampered_with(tmp_path: Path) -> None:
    storage, state = _save(tmp_path / "run")
    restored = reader.restore(storage, STEP)
    assert restored.objects["progress"]["samples_seen"] == 40
    for k, v in state.items():
        assert torch.equal(restored.objects["model"][k], v), k
    assert catalog.read_manifest(storage, STEP) == Manifest.from_bytes(
        (_snapshot_dir(storage) / layout.MANIFEST).read_bytes(), WHERE)


@pytest.mark.parametrize("name, rename_in_files", [("../../outside.bin", True), ("../../../outside.bin", True),
                                                   ("../../outside.bin", False)])
def test_restore_refuses_a_piece_naming_a_file_outside_the_snapshot(tmp_path: Path, name: str,
                                                                    rename_in_files: bool) -> None:
    storage, _ = _save(tmp_path / "run")
    snap = _snapshot_dir(storage)
    victim = "replicated-00000.bin"
    # A decoy with the right bytes where the name points: only the name check stands between
    # restore and reading it.
    decoy = (snap / name).resolve()
    decoy.write_bytes((snap / victim).read_bytes())
    raw = _read_raw(snap)
    if rename_in_files:
        _rename_file(raw, victim, name)
    else:
        for t in raw["tensors"].values():
            for p in t["pieces"]:
                p["file"] = name if p["file"] == victim else p["file"]
    _write_raw(snap, raw)  # re-signed: the hostile names, not the checksum, must stop it
    before = _files_under(tmp_path)

    with pytest.raises(CorruptSnapshotError) as info:
        reader.restore(storage, STEP)
    assert "refusing a hostile or corrupt manifest" in str(info.value)
    assert repr(name) in str(info.value)
    with pytest.raises(UnsafeSnapshotError, match=repr(name)):
        catalog.read_manifest(storage, STEP)
    assert reader.verify(storage, STEP) and repr(name) in reader.verify(storage, STEP)[0]
    assert _files_under(tmp_path) == before  # nothing created, removed or changed anywhere


class _Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from a snapshot file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _plant_pickle(snap: Path, victim: str, marker: Path) -> bytes:
    """Overwrite `victim` with a live pickle payload padded to the recorded size (only the CRC differs)."""
    size = (snap / victim).stat().st_size
    payload = pickle.dumps(_Payload(marker), protocol=2)
    assert len(payload) <= size, "the victim file is too small to hold the payload"
    data = payload + b"\0" * (size - len(payload))
    (snap / victim).write_bytes(data)
    return data


@pytest.mark.parametrize("victim", ["replicated-00000.bin", "rank-00000.bin"])
def test_restore_never_unpickles_a_planted_file(tmp_path: Path, victim: str) -> None:
    storage, _ = _save(tmp_path / "run")
    snap = _snapshot_dir(storage)
    marker = tmp_path / "pwned"
    _plant_pickle(snap, victim, marker)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control), protocol=2)).close()
    assert control.exists(), "the payload must be live: unpickling it creates its marker"

    with pytest.raises(CorruptSnapshotError) as info:
        reader.restore(storage, STEP)
    assert victim in str(info.value) and "checksum mismatch" in str(info.value)
    assert not marker.exists()
    with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
        reader.read_tensors(storage, STEP, "")
    assert not marker.exists()


def test_ckpt_verify_names_the_planted_file_and_fails(tmp_path: Path) -> None:
    storage, _ = _save(tmp_path / "run")
    snap = _snapshot_dir(storage)
    marker = tmp_path / "pwned"
    data = _plant_pickle(snap, "replicated-00000.bin", marker)
    assert checksum.extend(0, memoryview(data)) != catalog.read_manifest(storage, STEP).files["replicated-00000.bin"].crc32c

    result = run(dtrain_cmd("ckpt", "verify", str(tmp_path / "run")), timeout=120)
    assert result.returncode == 1, result.stdout
    assert f"BAD {snap}" in result.stdout
    assert f"{layout.committed_path(STEP)}/replicated-00000.bin: checksum mismatch" in result.stdout
    assert "rank-00000.bin" not in result.stdout  # the intact file is not blamed
    assert not marker.exists()
    assert os.listdir(tmp_path) == ["run"]
