"""The baselines, each as a pair: save (returns a wait) and restore.

Every method has the signature that `bench/dtrain_cases.py` fills in for dtrain:

    save(state, run_dir, step) -> wait       called on every rank at once; returns when training
                                             may change the parameters; wait() blocks until the
                                             snapshot is complete on this rank
    restore(state, run_dir, step) -> None    loads that snapshot into the live state, in place

The harness adds what is common to all of them (timing, an fsync of every file and directory under
the run dir, page-cache eviction, verification); nothing here measures anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.state import BenchState, state_tensors

Wait = Callable[[], None]
SaveFn = Callable[[BenchState, Path, int], Wait]
RestoreFn = Callable[[BenchState, Path, int], None]

_CHUNK = 64 << 20  # bytes per write/read call of the raw floor


@dataclass(frozen=True)
class Method:
    name: str  # what --only takes
    label: str  # what the table shows
    save: SaveFn
    restore: RestoreFn | None
    restore_label: str
    is_durable: bool = True  # False: `total` ends in memory, not on disk
    in_throughput: bool = False  # also measured every N steps in the training loop


def _done() -> None:
    return None


def _step_path(run_dir: Path, step: int, suffix: str = "") -> Path:
    return run_dir / f"step-{step:08d}{suffix}"


# -- torch.save ---------------------------------------------------------------------------------


def torch_save(state: BenchState, run_dir: Path, step: int) -> Wait:
    """Rank 0 pickles the whole state to one file and fsyncs it; other ranks return at once."""
    if state.rank == 0:
        payload = {"model": state.module.state_dict(), "optim": state.optimizer.state_dict()}
        with open(_step_path(run_dir, step, ".pt"), "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    return _done


def torch_load(state: BenchState, run_dir: Path, step: int) -> None:
    payload = torch.load(_step_path(run_dir, step, ".pt"), map_location="cpu", weights_only=True)
    state.module.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optim"])


# -- torchsnapshot ------------------------------------------------------------------------------


def _app_state(state: BenchState) -> dict[str, Any]:
    return {"model": state.module, "optim": state.optimizer}


def _replicated(state: BenchState) -> list[str] | None:
    # the saved module is the one inside DDP, so replication has to be declared
    return ["**"] if state.world_size > 1 else None


def torchsnapshot_take(state: BenchState, run_dir: Path, step: int) -> Wait:
    import torchsnapshot

    torchsnapshot.Snapshot.take(str(_step_path(run_dir, step)), _app_state(state),
                                replicated=_replicated(state))
    return _done


def torchsnapshot_async_take(state: BenchState, run_dir: Path, step: int) -> Wait:
    import torchsnapshot

    pending = torchsnapshot.Snapshot.async_take(str(_step_path(run_dir, step)), _app_state(state),
                                                replicated=_replicated(state))
    return lambda: _discard(pending.wait())


def torchsnapshot_restore(state: BenchState, run_dir: Path, step: int) -> None:
    import torchsnapshot

    torchsnapshot.Snapshot(str(_step_path(run_dir, step))).restore(_app_state(state))


def _discard(_: object) -> None:
    return None


# -- torch.distributed.checkpoint ---------------------------------------------------------------

_side_groups: dict[int, dist.ProcessGroup] = {}


def _dcp_state(state: BenchState) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(state.module, state.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _side_group(state: BenchState) -> dist.ProcessGroup:
    """A gloo group of its own: the background save runs collectives while training all-reduces."""
    if state.world_size not in _side_groups:
        _side_groups[state.world_size] = dist.new_group(backend="gloo")
    return _side_groups[state.world_size]


def dcp_save(state: BenchState, run_dir: Path, step: int) -> Wait:
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(state), checkpoint_id=str(_step_path(run_dir, step)))
    return _done


def dcp_async_save(state: BenchState, run_dir: Path, step: int) -> Wait:
    import torch.distributed.checkpoint as dcp

    future = dcp.async_save(_dcp_state(state), checkpoint_id=str(_step_path(run_dir, step)),
                            process_group=_side_group(state))
    return lambda: _discard(future.result())


def dcp_load(state: BenchState, run_dir: Path, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _dcp_state(state)
    dcp.load(sd, checkpoint_id=str(_step_path(run_dir, step)))
    set_state_dict(state.module, state.optimizer, model_state_dict=sd["model"],
                   optim_state_dict=sd["optim"])


# -- floors -------------------------------------------------------------------------------------

_copies: dict[tuple[Path, int], list[torch.Tensor]] = {}


def memory_copy(state: BenchState, run_dir: Path, step: int) -> Wait:
    """A clone of every tensor: the least any snapshot that does not block on disk must do."""
    _copies[(run_dir, step)] = [t.clone() for _, t in state_tensors(state)]
    return _done


def memory_copy_back(state: BenchState, run_dir: Path, step: int) -> None:
    copies = _copies.pop((run_dir, step))
    for (_, t), c in zip(state_tensors(state), copies, strict=True):
        t.copy_(c)


def raw_write(state: BenchState, run_dir: Path, step: int) -> Wait:
    """The state's bytes back to back: rank r writes the r-th of `world_size` equal parts to one
    file with 64 MiB writes, then fsyncs it."""
    directory = _step_path(run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = [t for _, t in state_tensors(state)]
    lo, hi = _bounds(tensors, state.rank, state.world_size)
    fd = os.open(directory / f"rank-{state.rank:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in _segments(tensors, lo, hi):
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return _done


def raw_read(state: BenchState, run_dir: Path, step: int) -> None:
    """Every rank reads every part (each rank needs the whole replicated state), 64 MiB reads
    straight into the live tensors."""
    directory = _step_path(run_dir, step)
    tensors = [t for _, t in state_tensors(state)]
    for rank in range(state.world_size):
        lo, hi = _bounds(tensors, rank, state.world_size)
        with open(directory / f"rank-{rank:05d}.bin", "rb", buffering=0) as f:
            for view in _segments(tensors, lo, hi):
                while view:
                    view = view[f.readinto(view):]


def _bounds(tensors: list[torch.Tensor], rank: int, world_size: int) -> tuple[int, int]:
    total = sum(t.nbytes for t in tensors)
    return total * rank // world_size, total * (rank + 1) // world_size


def _segments(tensors: list[torch.Tensor], lo: int, hi: int) -> Iterator[memoryview]:
    """Views of bytes [lo, hi) of the tensors laid end to end, at most _CHUNK each, no copies."""
    offset = 0
    for t in tensors:
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        start, end = max(lo, offset), min(hi, offset + len(view))
        for a in range(start, end, _CHUNK):
            yield view[a - offset:min(end, a + _CHUNK) - offset]
        offset += len(view)


# -- the registry -------------------------------------------------------------------------------


def _dtrain_save(state: BenchState, run_dir: Path, step: int) -> Wait:
    from bench import dtrain_cases

    return dtrain_cases.save(state, run_dir, step)


def _dtrain_restore(state: BenchState, run_dir: Path, step: int) -> None:
    from bench import dtrain_cases

    dtrain_cases.restore(state, run_dir, step)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("torch_save", "torch.save+fsync (rank 0)", torch_save, torch_load, "torch.load",
           in_throughput=True),
    Method("torchsnapshot_take", "torchsnapshot take", torchsnapshot_take, torchsnapshot_restore,
           "Snapshot.restore"),
    Method("torchsnapshot_async_take", "torchsnapshot async_take", torchsnapshot_async_take,
           torchsnapshot_restore, "Snapshot.restore", in_throughput=True),
    Method("dcp_save", "dcp.save", dcp_save, dcp_load, "dcp.load"),
    Method("dcp_async_save", "dcp.async_save", dcp_async_save, dcp_load, "dcp.load",
           in_throughput=True),
    Method("memory_copy", "memory copy (floor)", memory_copy, memory_copy_back, "copy back",
           is_durable=False),
    Method("raw_io", "raw write+fsync / read (floor)", raw_write, raw_read, "raw read"),
    Method("dtrain", "dtrain", _dtrain_save, _dtrain_restore, "dtrain restore", in_throughput=True),
]}
