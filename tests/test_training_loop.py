"""The training loop users run: DataLoader workers, micro-batches, bf16/fp16 precision, clipping.

Each is state or timing a resume must get exactly right:
- DataLoader workers read ahead; ranks SIGKILLed while batches are prefetched, and world sizes
  2 -> 3 -> 1, still train every step on exactly the uninterrupted run's samples.
- A resume at the same world size is bit-identical in fp32, bf16 and fp16 (the gradient scaler's
  scale and growth counter included), with micro-batches and clipping on.
- The step's mathematics does not depend on how a global batch is split: 1 rank accumulating
  micro-batches trains what 2 ranks without do, within float tolerance.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from dtrain.config import DataConfig, load_config
from dtrain.errors import ConfigError
from dtrain.loader import SampleReadError, StepBatches, micro_batch_count, micro_batches
from dtrain.precision import MixedPrecision
from dtrain.sampler import ResumableSampler
from tests.distributed import run_ranks
from tests.workloads import train, train_expecting_error, train_killing_one_rank, train_ledgered

# 470 samples, batch 32: 15 steps an epoch, the last partial; the run crosses into epoch 1.
DATA = ["task.options.num_samples=470", "snapshot.every_steps=3", "train.seed=9", "task.options.dropout=0.0",
        "dist.timeout_seconds=20"]
STEPS, STEPS_PER_EPOCH = 26, 15
WORKERS = ["data.num_workers=2", "data.prefetch_factor=2"]


def _read_ledger(prefix: Path, world: int) -> dict[int, list[int]]:
    """Each step's global batch (shares in rank order) for the steps every rank of an attempt began."""
    shares: list[dict[int, list[int]]] = []
    for rank in range(world):
        path = Path(f"{prefix}.rank{rank}")
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        shares.append({int(row[0]): [int(i) for i in row[1:]] for row in rows})
    steps = set.intersection(*(set(s) for s in shares))
    return {step: [i for share in shares for i in share[step]] for step in sorted(steps)}


def test_dataloader_workers_through_sigkills_and_2_3_1_read_every_sample_exactly_once(tmp_path: Path) -> None:
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    run_ranks(train_ledgered, 2, str(straight_dir), [*DATA, *WORKERS, f"train.steps={STEPS}"], str(tmp_path / "s"))
    reference = _read_ledger(tmp_path / "s", 2)
    assert sorted(reference) == list(range(STEPS))

    attempts = [(2, 1, 8), (3, 2, 19), (1, None, None)]  # (world size, rank SIGKILLed, before 0-based step)
    history: dict[int, list[int]] = {}
    for n, (world, victim, step) in enumerate(attempts):
        args = (str(run_dir), [*DATA, *WORKERS, f"train.steps={STEPS}"], str(tmp_path / f"a{n}"))
        if victim is None:
            run_ranks(train_ledgered, world, *args)
        else:
            with pytest.raises(AssertionError, match="failed"):
                run_ranks(train_killing_one_rank, world, *args, victim, step, timeout=120)
        for s, ids in _read_ledger(tmp_path / f"a{n}", world).items():
            assert ids == reference[s], f"attempt {n} (world size {world}) read other samples at step {s}"
            history[s] = ids

    resumes = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"event": "resume"' in line]
    assert [r["saved_world_size"] for r in resumes] == [2, 3], "each attempt resumes from the one before it"
    assert sorted(history) == list(range(STEPS))
    epoch0 = Counter(i for s in range(STEPS_PER_EPOCH) for i in history[s])
    assert sorted(epoch0) == list(range(470)) and set(epoch0.values()) == {1}, "duplicates or skips in epoch 0"


def _assert_same(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer state {i}/{k} differs"
    assert torch.equal(a["rng"], b["rng"]), "the rank's generator differs"
    assert a["precision"] == b["precision"], "the gradient scaler's state differs"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_bit_identical_with_micro_batches_clipping_and_precision(tmp_path: Path, precision: str) -> None:
    settings = [f"train.precision={precision}", "train.micro_batch_size=5", "train.grad_clip_norm=0.5",
                "snapshot.every_steps=6", "train.seed=4", "train.log_every_steps=3"]
    straight = run_ranks(train, 2, str(tmp_path / "straight"), ["train.steps=12", *settings])
    run_ranks(train, 2, str(tmp_path / "split"), ["train.steps=6", *settings])
    resumed = run_ranks(train, 2, str(tmp_path / "split"), ["train.steps=12", *settings])
    for rank in range(2):
        assert resumed[rank]["resumed_from"] == 6
        _assert_same(straight[rank], resumed[rank])
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 and r["data_wait_s"] >= 0 for r in logged)
    if precision == "fp16":  # the scaler ran 12 steps: its growth counter is part of what was restored
        assert straight[0]["precision"]["scaler"]["_growth_tracker"] > 0
        assert all("loss_scale" in r for r in logged)
    else:
        assert straight[0]["precision"]["scaler"] == {}


def test_one_rank_with_micro_batches_trains_what_two_ranks_without_do(tmp_path: Path) -> None:
    """Only the summation order differs (micro-batches on one rank, an all-reduce over two)."""
    settings = ["train.steps=10", "train.seed=2", "task.options.dropout=0.0", "train.grad_clip_norm=1.0",
                "snapshot.every_steps=0"]
    [one] = run_ranks(train, 1, str(tmp_path / "one"), [*settings, "train.micro_batch_size=6"])
    two = run_ranks(train, 2, str(tmp_path / "two"), settings)
    for name, w in two[0]["model"].items():
        torch.testing.assert_close(one["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((one["model"][k] - v).abs().max() for k, v in run_ranks(
        train, 1, str(tmp_path / "other"), [*settings, "train.micro_batch_size=6", "train.seed=3"])[0]["model"].items())
    assert moved > 1e-3, "another seed should train other weights: the comparison above would catch a wrong step"


# -- the pieces, in process --------------------------------------------------------------------


class Flaky(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 23:
            raise OSError("unreadable record")
        return torch.full((3,), float(i)), torch.tensor(i % 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_that_cannot_be_read_stops_the_run_naming_its_index(workers: int) -> None:
    sampler = ResumableSampler(40, 8, seed=0, rank=0, world_size=1)
    batches = iter(StepBatches(Flaky(), sampler, DataConfig(num_workers=workers), torch.device("cpu"), seed=0))
    with pytest.raises(SampleReadError, match=r"sample 23 of the training set \(step \d+\) could not be read"):
        for _ in range(5):  # one epoch: sample 23 is read in one of its 5 steps
            next(batches)


def test_workers_and_in_process_reads_give_the_same_batches_and_randomness() -> None:
    class Noisy(torch.utils.data.Dataset):  # an augmentation that draws from torch's generator
        def __len__(self) -> int:
            return 30

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((2,), float(i)) + torch.rand(2), torch.tensor(0)

    def first(workers: int, resume_at: int = 0) -> list[tuple[int, torch.Tensor]]:
        sampler = ResumableSampler(30, 6, seed=1, rank=1, world_size=2)
        sampler.load_state_dict({**sampler.state_dict(), "step": resume_at, "offset": 6 * resume_at})
        it = iter(StepBatches(Noisy(), sampler, DataConfig(num_workers=workers), torch.device("cpu"), seed=7))
        return [(step, batch[0]) for step, _, batch in (next(it) for _ in range(4))]

    in_process = first(0)
    for other in (first(2), first(0, resume_at=2)[:2]):
        for (s, x), (s2, x2) in zip(other, in_process[4 - len(other):] if other[0][0] == 3 else in_process,
                                    strict=False):
            assert s == s2 and torch.equal(x, x2), f"step {s}: other data or randomness"


def test_micro_batches_split_a_batch_into_pieces_of_at_most_the_size() -> None:
    batch = (torch.arange(10), torch.arange(10) * 2)
    pieces = micro_batches(batch, 4)
    assert [len(p[0]) for p in pieces] == [4, 4, 2]
    assert torch.equal(torch.cat([p[1] for p in pieces]), batch[1])
    assert micro_batches(batch, 0) == [batch] and micro_batches(batch, 10) == [batch]
    empty = (torch.zeros(0, 3), torch.zeros(0))
    assert micro_batches(empty, 4) == [empty]
    padded = micro_batches(batch, 4, count=5)  # FSDP: as many forwards on every rank
    assert [len(p[0]) for p in padded] == [4, 4, 2, 0, 0]
    assert micro_batch_count(10, 3, 2) == 2 and micro_batch_count(9, 3, 0) == 1 and micro_batch_count(1, 3, 4) == 1


def test_clipping_bounds_the_gradient_norm_and_reports_it_before_clipping() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    amp = MixedPrecision("fp32", torch.device("cpu"), clip_norm=0.01)
    amp.backward(model(torch.randn(8, 4) * 100).square().sum())
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    reported = amp.step(optimizer, model.parameters())
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert reported == pytest.approx(float(before)) and reported > 1.0
    assert float(after) == pytest.approx(0.01, rel=1e-3)


def test_a_fp16_scaler_resumes_with_its_scale_and_a_bf16_snapshot_gives_a_fresh_one() -> None:
    amp = MixedPrecision("fp16", torch.device("cpu"))
    amp.scaler.scale(torch.ones(()))  # the scaler's scale tensor exists once it has scaled a loss
    amp.scaler.update(new_scale=128.0)
    saved = amp.state_dict()
    restored = MixedPrecision("fp16", torch.device("cpu"))
    restored.load_state_dict(saved)
    assert restored.scale == 128.0
    fresh = MixedPrecision("fp16", torch.device("cpu"))
    fresh.load_state_dict(MixedPrecision("bf16", torch.device("cpu")).state_dict())
    assert fresh.scale == 2.0 ** 16


@pytest.mark.parametrize("key, value, named", [
    ("train.precision", '"fp8"', "fp32, bf16, fp16"), ("train.micro_batch_size", "-1", "micro_batch_size"),
    ("train.grad_clip_norm", "-0.5", "grad_clip_norm"), ("data.num_workers", "-2", "num_workers"),
    ("data.prefetch_factor", "0", "prefetch_factor"), ("data.pin_memory", '"yes"', "pin_memory")])
def test_bad_loop_settings_are_refused_naming_the_key(key: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, [f"{key}={value}"])


def test_a_data_worker_killed_stops_the_run_naming_the_step_awaited(tmp_path: Path) -> None:
    [message] = run_ranks(train_expecting_error, 1, str(tmp_path), [
        "task.data=tests.dying_data:build_datasets", "data.num_workers=2", "train.steps=40", "snapshot.every_steps=0"])
    assert re.search(r"a data worker failed while step \d+ \(samples \[\d+", message), message
    # torch's words for the death: its SIGCHLD handler's, or its queue's when that notices first
    assert re.search(r"killed by signal|exited unexpectedly", message) and "data.num_workers = 0" in message, message
