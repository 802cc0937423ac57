"""The state zoo: everything real training keeps, saved, verified, restored and compared bit for bit.

Under each staging mode, at world sizes 1 and 2 and across a change of world size: tied weights,
a buffer viewing a parameter, views and non-contiguous tensors, every dtype with every special
value, optimizer, scheduler and GradScaler state after real steps, and every kind of non-tensor
leaf. What a snapshot cannot hold is refused when saving, naming its key. A save holds the values
of the moment `save()` returned, whatever training does to the tensors after that, shared memory
included.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from dtrain.dist import solo_context
from dtrain.snapshot import reader
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage
from tests import zoo_states as zoo
from tests.distributed import run_ranks

SEED = 20261127
STEP = 5
STAGINGS = ["fork", "copy"]
SCENARIOS = {  # id -> (saved at, restored at, read strategy)
    "1to1": (1, 1, "one_host"),
    "2to2": (2, 2, "one_host"),
    "2to2-spread": (2, 2, "spread"),
    "1to2": (1, 2, "one_host"),
    "1to2-spread": (1, 2, "spread"),
    "2to1": (2, 1, "one_host"),
}


# --- comparing ---------------------------------------------------------------------------------


def assert_bitwise_equal(actual: Any, expected: Any, path: str) -> None:
    """`actual` is `expected` bit for bit: same types (tuple is not list, bool is not int), same
    dict keys in the same order, tensors of the same dtype and shape with the same bytes (NaN
    payloads included); floats equal in their bits, or both NaN. Fails naming the path."""
    if isinstance(expected, torch.Tensor):
        _assert_tensor_equal(actual, expected, path)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: a {type(actual).__name__}, saved a dict"
        keys = lambda d: [(type(k).__name__, k) for k in d]  # noqa: E731
        assert keys(actual) == keys(expected), f"{path}: keys {keys(actual)}, saved {keys(expected)}"
        for k in expected:
            assert_bitwise_equal(actual[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: a {type(actual).__name__}, saved a {type(expected).__name__}"
        assert len(actual) == len(expected), f"{path}: {len(actual)} items, saved {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert type(actual) is float, f"{path}: {actual!r} ({type(actual).__name__}), saved the float {expected!r}"
        same = struct.pack("<d", actual) == struct.pack("<d", expected) or (actual != actual and expected != expected)
        assert same, f"{path}: {actual!r}, saved {expected!r}"
    else:
        assert type(actual) is type(expected) and actual == expected, \
            f"{path}: {actual!r} ({type(actual).__name__}), saved {expected!r} ({type(expected).__name__})"


def _assert_tensor_equal(actual: Any, expected: torch.Tensor, path: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{path}: a {type(actual).__name__}, saved a tensor"
    assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype}, saved {expected.dtype}"
    assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)}, saved {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{path}: on {actual.device}, saved on {expected.device}"
    got, want = zoo.tensor_bytes(actual), zoo.tensor_bytes(expected)
    if torch.equal(got, want):
        return
    differ = (got != want).nonzero().flatten()
    first = int(differ[0])
    zeros = bool((got[differ] == 0).all())
    raise AssertionError(f"{path}: {len(differ)} of {len(want)} bytes differ from the saved ones, the first at byte "
                         f"{first} (0x{int(got[first]):02x}, saved 0x{int(want[first]):02x})"
                         + ("; every differing byte restored is zero" if zeros else ""))


def _mismatches(actual: Any, expected: Any, path: str, depth: int = 2) -> list[str]:
    """One line per entry, `depth` levels of dicts down, that is not restored bit for bit: one failure hides no other."""
    if depth == 0 or not isinstance(expected, dict) or not isinstance(actual, dict):
        try:
            assert_bitwise_equal(actual, expected, path)
        except AssertionError as e:
            return [str(e).splitlines()[0]]
        return []
    problems = [f"{path}: restored keys {list(actual)} are not the saved {list(expected)}"] if list(actual) != list(expected) else []
    for k in expected:
        if k in actual:
            problems += _mismatches(actual[k], expected[k], f"{path}[{k!r}]", depth - 1)
    return problems


_NAN = torch.tensor([0x7FC00000, 0x7FC00001], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize(("actual", "expected"), [
    pytest.param(_NAN[1:], _NAN[:1], id="nan-payload"),
    pytest.param(torch.tensor([-0.0]), torch.tensor([0.0]), id="negative-zero-tensor"),
    pytest.param(-0.0, 0.0, id="negative-zero-float"),
    pytest.param(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.float32), id="dtype"),
    pytest.param(torch.zeros(2, 3), torch.zeros(3, 2), id="shape"),
    pytest.param([1, 2], (1, 2), id="list-for-tuple"),
    pytest.param(1, True, id="int-for-bool"),
    pytest.param(1.0, 1, id="float-for-int"),
    pytest.param({"1": 0}, {1: 0}, id="str-key-for-int-key"),
    pytest.param({"b": 0, "a": 1}, {"a": 1, "b": 0}, id="key-order"),
    pytest.param(float("nan"), float("inf"), id="nan-for-inf"),
    pytest.param("a\x00", "a", id="nul"),
])
def test_the_comparison_tells_apart_what_a_round_trip_could_confuse(actual: Any, expected: Any) -> None:
    with pytest.raises(AssertionError, match=r"^state"):
        assert_bitwise_equal(actual, expected, "state")


# --- saving and restoring ----------------------------------------------------------------------


def _writer(run_dir: Path, staging: str, storage: LocalStorage | None = None) -> SnapshotWriter:
    return SnapshotWriter(storage or LocalStorage(run_dir), solo_context(), staging=staging,
                          file_bytes=zoo.FILE_BYTES, timeout_seconds=60)


def _committed_steps(run_dir: Path) -> list[int]:
    """The steps of the committed snapshots in `run_dir`, read off the documented layout."""
    dirs = (run_dir / "snapshots").glob("step_*")
    return sorted(int(d.name.removeprefix("step_")) for d in dirs if (d / "manifest.json").is_file())


def _restored(run_dir: Path, step: int, into: dict[str, Any] | None = None) -> dict[str, Any]:
    return zoo.restored_record(reader.restore(LocalStorage(run_dir), step, solo_context(), into=into))


@dataclass(repr=False)  # a failing test prints its arguments: not megabytes of restored state
class ZooRuns:
    """Each save of the zoo and each restore of it, made once for the whole module, when first needed."""

    root: Path
    _solo: dict[str, Path] = field(default_factory=dict)
    _ranks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _ranks_error: str | None = None
    _restored: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ZooRuns({self.root})"

    def solo_dir(self, staging: str) -> Path:
        """A run dir holding the zoo saved at world size 1."""
        if staging not in self._solo:
            run_dir = self.root / f"solo-{staging}"
            _writer(run_dir, staging).save(STEP, zoo.build_zoo(SEED), zoo.build_per_rank(SEED, 0), zoo.meta(STEP)).wait()
            self._solo[staging] = run_dir
        return self._solo[staging]

    def ranks(self, staging: str) -> list[dict[str, Any]]:
        """What each of 2 ranks reported for `staging`: its refusals, its save of the zoo, its restores.

        One spawn serves every staging mode: starting the ranks is most of what this costs."""
        if self._ranks_error is not None:  # failed once: not spawned again for every test that needs it
            pytest.fail(self._ranks_error)
        if not self._ranks:
            runs = {s: (str(self.multi_dir(s)), str(self.solo_dir(s))) for s in STAGINGS}
            try:
                reports = run_ranks(zoo.zoo_ranks, 2, SEED, runs, STEP, timeout=240)
            except AssertionError as e:
                self._ranks_error = f"the world-size-2 ranks failed: {e}"
                raise
            self._ranks.update({s: [{**r[s], "fingerprint": r["fingerprint"]} for r in reports] for s in STAGINGS})
        return self._ranks[staging]

    def multi_dir(self, staging: str) -> Path:
        return self.root / f"world2-{staging}"

    def saved_dir(self, staging: str, world: int) -> Path:
        if world == 1:
            return self.solo_dir(staging)
        self.ranks(staging)
        return self.multi_dir(staging)

    def restored(self, staging: str, scenario: str) -> list[dict[str, Any]]:
        """Per restoring rank: {"objects", "per_rank", "tied_share_storage"}."""
        saved, restored, strategy = SCENARIOS[scenario]
        if restored == 1:
            if (staging, scenario) not in self._restored:
                self._restored[staging, scenario] = [_restored(self.saved_dir(staging, saved), STEP)]
            return self._restored[staging, scenario]
        source = "same_world" if saved == 2 else "from_world_1"
        results = []
        for rank, report in enumerate(self.ranks(staging)):
            phase = report[f"{source}/{strategy}"]
            if "error" in phase:
                pytest.fail(f"rank {rank} could not restore ({scenario}):\n{phase['error']}")
            results.append(phase["value"])
        return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ZooRuns:
    return ZooRuns(tmp_path_factory.mktemp("zoo"))


@functools.cache
def expected_zoo() -> dict[str, Any]:
    """The zoo built anew: nothing a save did to its own copy can leak into what is expected."""
    return zoo.build_zoo(SEED)


# --- the zoo, everywhere -----------------------------------------------------------------------

scenario_params = pytest.mark.parametrize("scenario", list(SCENARIOS))
staging_params = pytest.mark.parametrize("staging", STAGINGS)


@staging_params
@pytest.mark.parametrize("world", [1, 2])
def test_saved_zoo_verifies(runs: ZooRuns, staging: str, world: int) -> None:
    run_dir = runs.saved_dir(staging, world)
    if world == 2:
        for rank, report in enumerate(runs.ranks(staging)):
            assert "error" not in report["save"], f"rank {rank} could not save:\n{report['save'].get('error')}"
    assert _committed_steps(run_dir) == [STEP]
    assert reader.verify(LocalStorage(run_dir), STEP) == []
    manifest = reader.restore(LocalStorage(run_dir), STEP, solo_context()).manifest
    assert manifest.world_size == world
    assert len(manifest.files) > 4  # FILE_BYTES cut the larger tensors over several files


@staging_params
@scenario_params
def test_restored_zoo_is_bit_for_bit_what_was_saved(runs: ZooRuns, staging: str, scenario: str) -> None:
    problems = []
    for rank, got in enumerate(runs.restored(staging, scenario)):
        problems += _mismatches(got["objects"], expected_zoo(), f"rank {rank}: objects")
    assert not problems, "\n".join(problems)


@staging_params
@scenario_params
def test_per_rank_state_is_restored_only_on_the_same_world_size(runs: ZooRuns, staging: str, scenario: str) -> None:
    saved, restored, _ = SCENARIOS[scenario]
    for rank, got in enumerate(runs.restored(staging, scenario)):
        if saved != restored:
            assert got["per_rank"] is None, f"rank {rank}: per-rank state restored on another world size"
        else:
            assert_bitwise_equal(got["per_rank"], zoo.build_per_rank(SEED, rank), f"rank {rank}: per-rank")


@staging_params
@scenario_params
def test_restored_tied_weights_share_storage(runs: ZooRuns, staging: str, scenario: str) -> None:
    for rank, got in enumerate(runs.restored(staging, scenario)):
        assert got["tied_share_storage"], f"rank {rank}: model/emb.weight and model/head.weight restored as two tensors"


@staging_params
@scenario_params
def test_restored_zoo_loads_into_fresh_objects(runs: ZooRuns, staging: str, scenario: str) -> None:
    want = {k: expected_zoo()[k] for k in ("model", "model_optimizer", "optimizers", "scheduler", "scaler")}
    problems = []
    for rank, got in enumerate(runs.restored(staging, scenario)):
        loaded, model = zoo.load_fresh(got["objects"])
        assert model.head.weight is model.emb.weight
        assert model.proj_rows.untyped_storage().data_ptr() == model.proj.weight.untyped_storage().data_ptr()
        problems += _mismatches(loaded, want, f"rank {rank}: loaded")
    assert not problems, "\n".join(problems)


@staging_params
def test_zoo_builds_the_same_bits_in_every_process(runs: ZooRuns, staging: str) -> None:
    """Guards the comparisons above: the ranks saved exactly what this process expects."""
    assert [r["fingerprint"] for r in runs.ranks(staging)] == [zoo.fingerprint(expected_zoo())] * 2


# --- fork staging hazards ------------------------------------------------------------------------


@staging_params
def test_tied_embedding_restores_tied_and_whole(tmp_path: Path, staging: str) -> None:
    """A fork child gives up each piece's pages once written: the tied key written second must not read them."""
    torch.manual_seed(SEED)
    model = zoo.TiedLM()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _writer(tmp_path, staging).save(STEP, {"model": model.state_dict()}, {}, zoo.meta(STEP)).wait()
    assert reader.verify(LocalStorage(tmp_path), STEP) == []

    got = _restored(tmp_path, STEP)
    problems = _mismatches(got["objects"]["model"], saved, "restored model", depth=1)
    assert not problems, "\n".join(problems)
    assert got["tied_share_storage"], "model/emb.weight and model/head.weight restored as two tensors"
    for into in (False, True):  # load_state_dict of the restored dict, and a restore straight into the live tensors
        torch.manual_seed(SEED + 1)
        fresh = zoo.TiedLM()
        state = _restored(tmp_path, STEP, into={"model": fresh.state_dict()} if into else None)["objects"]["model"]
        fresh.load_state_dict(state)
        assert fresh.head.weight is fresh.emb.weight
        assert_bitwise_equal(dict(fresh.state_dict()), saved, f"fresh model (into={into})")


class GatedStorage(LocalStorage):
    """A disk on which no shard file is opened before `gate` exists: the save cannot have written a
    byte before the test changed the tensors, whatever the scheduling (a fork child checks it too)."""

    def __init__(self, root: Path, gate: Path) -> None:
        super().__init__(root)
        self.gate = gate

    def open_write(self, path: str) -> Any:
        deadline = time.monotonic() + 60
        while not self.gate.exists():
            if time.monotonic() > deadline:
                raise OSError(f"the test never opened the gate {self.gate}")
            time.sleep(0.002)
        return super().open_write(path)


@staging_params
@pytest.mark.parametrize("memory", ["plain", "shared"])
def test_snapshot_holds_the_values_of_save_time(tmp_path: Path, staging: str, memory: str) -> None:
    """Training changes the tensors right after save() returns, before a byte is written: the snapshot
    must hold them as they were. Copy-on-write protects plain memory after a fork, not shared memory."""
    g = torch.Generator().manual_seed(SEED)
    weight = torch.randn(128, 256, generator=g)  # 128 KiB: split over files, many pages
    if memory == "shared":
        weight.share_memory_()
        assert weight.is_shared()
    step_count = torch.tensor(41, dtype=torch.int64)
    rng = torch.randn(64, generator=g)
    saved = {"weight": weight.clone(), "step": step_count.clone(), "rng": rng.clone()}
    gate = tmp_path / "gate"
    storage = GatedStorage(tmp_path / "run", gate)
    writer = _writer(tmp_path / "run", staging, storage)

    pending = writer.save(STEP, {"live": {"weight": weight, "step": step_count}}, {"rng": rng}, zoo.meta(STEP))
    weight.mul_(-2.0).add_(1.0)  # what the next optimizer step does, in place
    step_count.add_(1)
    rng.normal_(generator=g)
    gate.touch()
    pending.wait()

    assert reader.verify(LocalStorage(tmp_path / "run"), STEP) == []
    got = reader.restore(LocalStorage(tmp_path / "run"), STEP, solo_context())
    assert not torch.equal(got.objects["live"]["weight"], weight), "the snapshot holds values set after save() returned"
    assert_bitwise_equal(got.objects["live"], {"weight": saved["weight"], "step": saved["step"]}, "live")
    assert_bitwise_equal(got.per_rank, {"rng": saved["rng"]}, "per_rank")
    assert torch.equal(weight, saved["weight"] * -2.0 + 1.0)  # the trainer's own values are untouched


# --- what a snapshot cannot hold -----------------------------------------------------------------


def _assert_names_bad_key(message: str | None, case: str) -> None:
    assert message is not None, f"{case}: save() accepted a state a snapshot cannot hold"
    assert message.startswith("SnapshotError"), f"{case}: {message}"
    at = message.find(zoo.BAD_OUTER)
    assert at >= 0 and zoo.BAD_INNER in message[at:], f"{case}: the error does not name the key path: {message}"


@staging_params
@pytest.mark.parametrize("case", list(zoo.refusals()))
def test_unsupported_state_is_refused_at_save_naming_its_key(tmp_path: Path, staging: str, case: str) -> None:
    replicated, per_rank = zoo.refusals()[case]
    writer = _writer(tmp_path, staging)
    message = zoo.refusal_of(writer, STEP, replicated, per_rank)
    _assert_names_bad_key(message, case)
    assert _committed_steps(tmp_path) == []
    pending_dir = tmp_path / "snapshots" / ".pending"
    assert not pending_dir.exists() or os.listdir(pending_dir) == [], "a refused save left files behind"
    writer.save(STEP, {"good": {"w": torch.ones(4)}}, {}, zoo.meta(STEP)).wait()  # the writer is still usable
    assert _committed_steps(tmp_path) == [STEP]


@staging_params
def test_unsupported_state_is_refused_on_every_rank(runs: ZooRuns, staging: str) -> None:
    for rank, report in enumerate(runs.ranks(staging)):
        for case in zoo.RANK_REFUSALS:
            _assert_names_bad_key(report["refusals"][case], f"rank {rank}, {case}")
    assert _committed_steps(runs.multi_dir(staging)) == [STEP]  # none of the refused ones


@staging_params
def test_quantized_tensor_is_refused_without_crashing_the_trainer(tmp_path: Path, staging: str) -> None:
    """Reading a quantized tensor's bytes as uint8 can crash the process: the check must come first."""
    code = f"from tests.zoo_states import quantized_refusal; quantized_refusal({staging!r}, {str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    died = f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit code {done.returncode}"
    assert done.returncode == 0, f"saving a quantized tensor ended the process ({died}):\n{done.stderr[-2000:]}"
    _assert_names_bad_key(done.stdout.strip().splitlines()[-1], "quantized_tensor")
    assert _committed_steps(tmp_path) == []
