"""State dicts split into a JSON skeleton plus tensors and joined back (`tree`), and the plan that
cuts replicated tensors into files and spreads them over the ranks (`plan`)."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest
import torch

from dtrain.errors import SnapshotError, UnsafeSnapshotError
from dtrain.snapshot.plan import PlannedFile, PlannedPiece, plan_replicated, plan_single_file, spread
from dtrain.snapshot.tree import flatten, unflatten


def round_trip(obj: Any, prefix: str = "obj") -> tuple[Any, dict[str, torch.Tensor]]:
    """Flatten, pass the skeleton through JSON as the manifest does, and unflatten."""
    skeleton, tensors = flatten(obj, prefix)
    through_json = json.loads(json.dumps(skeleton))
    return unflatten(through_json, {k: t.clone() for k, t in tensors.items()}), tensors


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Equal in structure, in container and scalar types, and in tensor values and dtypes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), path
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k!r}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}/{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, path


def _trained_adamw() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    model(torch.randn(3, 6)).pow(2).sum().backward()
    opt.step()
    return model, opt


# -- tree: round trips ----------------------------------------------------------------------------


def test_adamw_state_dict_round_trips_and_trains_on_identically() -> None:
    model, opt = _trained_adamw()
    state = opt.state_dict()
    got, tensors = round_trip(state, "optimizer")
    assert_same(got, state)
    assert list(got["state"]) == [0, 1, 2, 3]  # int keys stay ints
    assert got["param_groups"][0]["betas"] == (0.8, 0.95)  # a tuple stays a tuple
    assert "optimizer/state/0/exp_avg" in tensors and "optimizer/state/3/exp_avg_sq" in tensors

    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters())
    twin_opt.load_state_dict(got)
    x = torch.randn(3, 6)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_linear_lr_scheduler_state_dict_round_trips() -> None:
    _, opt = _trained_adamw()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=10)
    for _ in range(3):
        opt.step()
        sched.step()
    got, tensors = round_trip(sched.state_dict(), "scheduler")
    assert_same(got, sched.state_dict())
    assert tensors == {}

    _, opt2 = _trained_adamw()
    resumed = torch.optim.lr_scheduler.LinearLR(opt2, start_factor=0.25, total_iters=10)
    opt2.load_state_dict(round_trip(opt.state_dict())[0])  # LinearLR scales the optimizer's current lr
    resumed.load_state_dict(got)
    opt.step(), sched.step()
    opt2.step(), resumed.step()
    assert resumed.get_last_lr() == sched.get_last_lr()


def test_nested_tuples_and_lists_keep_their_shape() -> None:
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    obj = {"a": (1, [2, (3, t)], ()), "b": [[], {}, ((),)], "c": None, "d": "text", "e": [True, False]}
    got, tensors = round_trip(obj)
    assert_same(got, obj)
    assert list(tensors) == ["obj/a/1/1/1"]


def test_nan_and_inf_floats_survive() -> None:
    obj = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "tiny": 5e-324, "neg0": -0.0}
    got, _ = round_trip(obj)
    assert_same(got, obj)
    assert math.copysign(1.0, got["neg0"]) == -1.0


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.float32(1.5), 1.5),
        (np.float64(2.25), 2.25),
        (np.int64(7), 7),
        (np.int8(-3), -3),
        (np.uint32(4_000_000_000), 4_000_000_000),
        (np.bool_(True), True),
        (np.float32("nan"), float("nan")),
    ],
)
def test_numpy_scalars_become_python_scalars(value: Any, expected: Any) -> None:
    got, tensors = round_trip({"x": value})
    assert tensors == {}
    assert type(got["x"]) is type(expected)
    assert_same(got["x"], expected)


@pytest.mark.parametrize(
    "obj",
    [
        {0: "a", 1: "b"},
        {"x": 1, 2: "mixed"},
        {None: 1, 1.5: 2, True: 3},
        {"__tensor__": "not a tensor reference"},  # a key that looks like a tag stays a plain key
        {"__tuple__": [1, 2]},
        {"__dict__": [[1, 2]]},
        {"nested": {"__tensor__": "x", "y": [1]}},
    ],
)
def test_dicts_with_non_string_or_tag_like_keys_round_trip(obj: dict) -> None:
    got, _ = round_trip(obj)
    assert_same(got, obj)


def test_tensors_are_detached_and_keyed_by_path() -> None:
    w = torch.randn(3, requires_grad=True)
    skeleton, tensors = flatten({"layer": {"weight": w}, "buf": [torch.zeros(2)]}, "model")
    assert skeleton == {"layer": {"weight": {"__tensor__": "model/layer/weight"}}, "buf": [{"__tensor__": "model/buf/0"}]}
    assert not tensors["model/layer/weight"].requires_grad
    assert torch.equal(tensors["model/layer/weight"], w.detach())


def test_two_tensors_on_the_same_path_get_distinct_keys() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    obj = {"x/y": a, "x": {"y": b}}
    got, tensors = round_trip(obj, "p")
    assert len(tensors) == 2
    assert_same(got, obj)


def test_a_disambiguated_key_never_overwrites_another_tensor() -> None:
    t0, t1, t2 = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    obj = {"a/b#2": t2, "a": {"b": t0}, "a/b": t1}
    got, tensors = round_trip(obj, "p")
    assert len(tensors) == 3
    assert_same(got, obj)


# -- tree: refusals -------------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    "obj, path, kind",
    [
        ({"fn": lambda x: x}, "model/fn", "function"),
        ({"layer": {"thing": Opaque()}}, "model/layer/thing", "Opaque"),
        ({"ids": {1, 2}}, "model/ids", "set"),
        ({"ids": frozenset()}, "model/ids", "frozenset"),
        ({"xs": [1, (2, b"raw")]}, "model/xs/1/1", "bytes"),
        ({"z": 1 + 2j}, "model/z", "complex"),
        ({"arr": np.zeros(3)}, "model/arr", "ndarray"),
        ({"dev": torch.device("cpu")}, "model/dev", "device"),
    ],
)
def test_values_that_are_not_plain_data_are_refused_naming_the_path(obj: Any, path: str, kind: str) -> None:
    with pytest.raises(SnapshotError) as info:
        flatten(obj, "model")
    message = str(info.value)
    assert message.startswith(f"{path}: a {kind} cannot go into a snapshot")
    assert "return plain data from state_dict" in message


def test_a_dict_key_that_is_not_a_scalar_is_refused_naming_the_path() -> None:
    with pytest.raises(SnapshotError, match=r"^model/groups: dict key \(1, 2\) \(tuple\)"):
        flatten({"groups": {(1, 2): 3}}, "model")


@pytest.mark.parametrize("skeleton", [{"__tensor__": "missing"}, {"__tensor__": 3}, [{"__tensor__": None}]])
def test_unflatten_refuses_a_tensor_the_manifest_does_not_describe(skeleton: Any) -> None:
    with pytest.raises(UnsafeSnapshotError, match="does not describe"):
        unflatten(skeleton, {"present": torch.zeros(1)})


@pytest.mark.parametrize("skeleton", [{"__tuple__": 5}, {"__dict__": 5}, {"__dict__": [[1]]}, {"__dict__": [[[1], 2]]}])
def test_unflatten_refuses_a_malformed_tag(skeleton: Any) -> None:
    with pytest.raises(UnsafeSnapshotError):
        unflatten(skeleton, {})


# -- plan ------------------------------------------------------------------------------------------


def assert_valid_plan(plan: list[PlannedFile], sizes: dict[str, int], world: int, file_bytes: int) -> None:
    assert [f.name for f in plan] == [f"replicated-{i:05d}.bin" for i in range(len(plan))]
    by_key: dict[str, list[PlannedPiece]] = {k: [] for k in sizes}
    for f in plan:
        assert 0 <= f.writer < world
        assert f.nbytes <= file_bytes
        offset = 0
        for p in f.pieces:  # pieces are packed back to back from the start of the file
            assert p.file_offset == offset and 0 <= p.nbytes <= file_bytes
            offset += p.nbytes
            by_key[p.key].append(p)
    for key, n in sizes.items():  # every byte of every tensor exactly once, in order
        pieces = sorted(by_key[key], key=lambda p: p.tensor_offset)
        assert pieces, f"{key} has no piece"
        covered = 0
        for p in pieces:
            assert p.tensor_offset == covered, key
            covered += p.nbytes
        assert covered == n, key
        if n == 0:
            assert len(pieces) == 1
    loads = [0] * world
    for f in plan:
        loads[f.writer] += f.nbytes
    largest = max((f.nbytes for f in plan), default=0)
    assert max(loads) - min(loads) <= largest, loads


PLAN_CASES = [
    ({"a": 10}, 1, 4),
    ({"a": 8}, 2, 8),  # exactly one file's worth
    ({"a": 9}, 2, 8),  # one byte over
    ({"a": 100, "b": 3, "c": 0, "d": 64}, 3, 16),
    ({f"t{i}": i for i in range(20)}, 4, 32),  # many small tensors packed together
    ({"big": 1000, "small": 1}, 2, 7),
    ({"e1": 0, "e2": 0}, 2, 8),  # only empty tensors
    ({"a": 5, "b": 5, "c": 5, "d": 5}, 8, 5),  # more ranks than files
    ({"x": 3 * 2**20 + 17, "y": 2**20}, 3, 2**20),
]


@pytest.mark.parametrize("sizes, world, file_bytes", PLAN_CASES)
def test_plan_replicated_covers_every_byte_once_within_limits(sizes: dict[str, int], world: int,
                                                              file_bytes: int) -> None:
    plan = plan_replicated(sizes, world, file_bytes)
    assert_valid_plan(plan, sizes, world, file_bytes)
    assert plan_replicated(dict(sizes), world, file_bytes) == plan  # every rank computes the same plan


def test_plan_replicated_random_cases() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        sizes = {f"k{i}": rng.choice([0, 1, rng.randrange(1, 50), rng.randrange(1, 500)])
                 for i in range(rng.randrange(1, 12))}
        world, file_bytes = rng.randrange(1, 6), rng.randrange(1, 64)
        assert_valid_plan(plan_replicated(sizes, world, file_bytes), sizes, world, file_bytes)


def test_plan_replicated_exact_layout() -> None:
    plan = plan_replicated({"a": 10, "b": 5, "c": 0}, 2, 8)
    assert plan == [
        PlannedFile("replicated-00000.bin", 0, (PlannedPiece("a", 0, 8, 0),)),
        PlannedFile("replicated-00001.bin", 1, (PlannedPiece("a", 8, 2, 0), PlannedPiece("b", 0, 5, 2),
                                                 PlannedPiece("c", 0, 0, 7))),
    ]


def test_plan_replicated_of_nothing_is_empty() -> None:
    assert plan_replicated({}, 4, 8) == []


def test_plan_single_file_packs_whole_tensors_in_order() -> None:
    f = plan_single_file("rank-00002.bin", {"a": 4, "b": 0, "c": 7}, 2)
    assert f == PlannedFile("rank-00002.bin", 2, (PlannedPiece("a", 0, 4, 0), PlannedPiece("b", 0, 0, 4),
                                                  PlannedPiece("c", 0, 7, 4)))
    assert f.nbytes == 11


@pytest.mark.parametrize(
    "loads, world, owners",
    [
        ([], 3, []),
        ([5], 3, [0]),
        ([5, 5], 1, [0, 0]),
        ([1, 1, 1], 3, [0, 1, 2]),
        ([3, 3, 3, 3], 2, [0, 1, 0, 1]),
        ([1, 2, 3], 2, [1, 1, 0]),  # largest first: 3 -> 0, 2 -> 1, 1 -> the less loaded 1
        ([5, 1, 1, 1, 1, 1], 2, [0, 1, 1, 1, 1, 1]),
        ([2, 2], 4, [0, 1]),  # ties go to the lowest rank
        ([0, 0, 0], 2, [0, 0, 0]),
        ([10, 7, 6, 5, 4], 2, [0, 1, 1, 0, 1]),
    ],
)
def test_spread(loads: list[int], world: int, owners: list[int]) -> None:
    assert spread(loads, world) == owners


def test_spread_keeps_the_load_gap_within_the_largest_load() -> None:
    rng = random.Random(99)
    for _ in range(300):
        loads = [rng.randrange(0, 1000) for _ in range(rng.randrange(0, 30))]
        world = rng.randrange(1, 9)
        owners = spread(loads, world)
        assert len(owners) == len(loads) and all(0 <= r < world for r in owners)
        totals = [sum(n for n, r in zip(loads, owners, strict=True) if r == rank) for rank in range(world)]
        assert max(totals) - min(totals) <= max(loads, default=0)
        assert spread(list(loads), world) == owners
