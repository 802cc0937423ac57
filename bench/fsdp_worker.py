"""One rank of an FSDP bench launch: build the sharded state, then time one method's saves or restores.

A launch runs one method at one world size (`spec["mode"]`):

- `save`, at the world size that saves: each repetition saves, fsyncs, drops the page cache and
  restores in place. The last repetition's run dir is kept for the other launches.
- `restore`, at another world size: the same model sharded over this many ranks, built with other
  values, restores that kept snapshot `reps` times.

Restores are checked against a fingerprint of the state that does not depend on how it is
sharded: per tensor, the sum over its elements of their bits times a weight drawn from their
global index, modulo 2**64. Integer sums wrap the same way in any grouping, so the fingerprint of
a tensor is exactly equal whether it was summed over 1, 2 or 3 shards, and a value in the wrong
place changes it.

Events go to `<log_dir>/rank-<r>.jsonl` through `bench.worker`'s log (`state`, `rep`, `result`,
`error`); the parent (`bench/fsdp.py`) reads them.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from bench.measure import (
    MB,
    RssSampler,
    barrier,
    evict,
    fresh_run_dir,
    fsync_tree,
    memory_bytes,
    remove_run_dir,
    trim_heap,
)
from bench.methods import METHODS, Method
from bench.state import BATCH, DEPTH, SEED, BenchState, train_step, width_for
from bench.worker import EventLog, import_libraries, one_line, quiet_warnings

logger = logging.getLogger("bench")

STEP = 1  # the step every snapshot is saved at
_KEPT_ELEMENTS = 1024  # `mutate` changes this many elements at the head and at the tail
_ODD_WEIGHT = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64; any odd constant spreads the indices
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def main(rank: int, spec: dict[str, Any]) -> None:
    """Entry point of a spawned rank; `spec` is built by `bench/fsdp.py`."""
    quiet_warnings()
    n = str(spec["world_size"])
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(spec["port"])})
    logging.basicConfig(level=logging.WARNING, format=f"[bench fsdp rank {rank} %(relativeCreated)6.0f ms] %(message)s")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log = EventLog(Path(spec["log_dir"]) / f"rank-{rank}.jsonl")
    try:
        _run(rank, spec, log)
    except Exception:
        log.write({"event": "error", "error": traceback.format_exc(limit=8)})
        os._exit(1)  # the other ranks then fail in their next collective instead of waiting on this one


def _run(rank: int, spec: dict[str, Any], log: EventLog) -> None:
    import_libraries()
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["collective_timeout_s"]))
    start = time.perf_counter()
    is_saving = spec["mode"] == "save"
    # a restoring launch starts from other values, so that a restore that skips a tensor shows
    state = build_fsdp_state(spec["state_bytes"], rank, spec["world_size"], SEED if is_saving else SEED + 1)
    prints = fingerprints(state)
    log.write({"event": "state", "nbytes": global_nbytes(state), "local_nbytes": local_nbytes(state),
               "width": state.width, "fingerprint": prints, "build_s": time.perf_counter() - start})
    method = METHODS[spec["method"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        if is_saving:
            result = measure_saves(method, state, spec, prints, log)
        else:
            result = measure_restores(method, state, spec, spec["expected"], log)
    result["warnings"] = sorted({one_line(w.message) for w in caught} - {""})
    log.write({"event": "result", **result})
    dist.barrier()
    dist.destroy_process_group()


# -- the state ----------------------------------------------------------------------------------


def build_fsdp_state(state_bytes: int, rank: int, world_size: int, seed: int = SEED) -> BenchState:
    """bench.state's MLP holding `state_bytes` in all (1/world_size of it per rank), every Linear
    wrapped with `fully_shard` and then the whole model, after one Adam step.

    The last layer has one output more than the others: its rows split unevenly over any world
    size above 1, the case a resharding restore most easily gets wrong.

    Example:
        state = build_fsdp_state(1 << 30, rank=0, world_size=2)
    """
    width = width_for(state_bytes)
    torch.manual_seed(seed)  # the same full tensors on every rank, each keeps its own rows
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(width, width + 1 if i == DEPTH - 1 else width))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    module = nn.Sequential(*layers)
    for layer in module:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(module)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    inputs, targets = torch.randn(BATCH, width), torch.randn(BATCH, width + 1)
    state = BenchState(module, module, optimizer, rank, world_size, width, inputs, targets)
    train_step(state)
    return state


def named_state(state: BenchState) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and optimizer state tensor (DTensors, and Adam's plain `step`), by name, in
    an order that is the same at every world size."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, param in state.module.named_parameters():
        out.append((name, param))
        for key, value in sorted(state.optimizer.state[param].items()):
            if isinstance(value, torch.Tensor):
                out.append((f"{name}.{key}", value))
    return out


def local_tensors(state: BenchState) -> list[torch.Tensor]:
    """This rank's shard of every DTensor, and every plain tensor; views of the live storage."""
    return [t.to_local().detach() if isinstance(t, DTensor) else t.detach() for _, t in named_state(state)]


def local_nbytes(state: BenchState) -> int:
    return sum(t.nbytes for t in local_tensors(state))


def global_nbytes(state: BenchState) -> int:
    """Bytes of the whole state: every shard once, and the replicated `step` tensors once."""
    sharded = torch.tensor([sum(t.to_local().nbytes for _, t in named_state(state) if isinstance(t, DTensor))])
    dist.all_reduce(sharded)
    return int(sharded) + sum(t.nbytes for _, t in named_state(state) if not isinstance(t, DTensor))


@torch.no_grad()
def mutate(state: BenchState) -> None:
    """Change the head and tail of every local tensor, as the next training step would."""
    for t in local_tensors(state):
        flat = t.view(-1)
        flat[:_KEPT_ELEMENTS].add_(1)
        flat[-_KEPT_ELEMENTS:].add_(1)


class Edges:
    """What `mutate` changes, kept from the state as built: undoes it after a restore that failed,
    so that the next repetition saves the same state."""

    def __init__(self, state: BenchState) -> None:
        self._edges = [(t.view(-1)[:_KEPT_ELEMENTS].clone(), t.view(-1)[-_KEPT_ELEMENTS:].clone())
                       for t in local_tensors(state)]

    @torch.no_grad()
    def reset(self, state: BenchState, expected: list[int]) -> None:
        for t, (head, tail) in zip(local_tensors(state), self._edges, strict=True):
            t.view(-1)[:_KEPT_ELEMENTS].copy_(head)
            t.view(-1)[-_KEPT_ELEMENTS:].copy_(tail)
        if fingerprints(state) != expected:
            raise RuntimeError("the FSDP state changed beyond what mutate() touches; "
                               "later repetitions would not save the same state")


# -- the fingerprint ----------------------------------------------------------------------------


def fingerprints(state: BenchState) -> list[int]:
    """One integer per tensor of `named_state`, the same on every rank and at every world size."""
    sums = torch.tensor([_local_fingerprint(t, state.rank) for _, t in named_state(state)], dtype=torch.int64)
    dist.all_reduce(sums)  # wraps modulo 2**64, as the local sums do
    return [int(s) for s in sums]


def _local_fingerprint(t: torch.Tensor, rank: int) -> int:
    if isinstance(t, DTensor):
        local, first = t.to_local().detach(), _first_element(t)
    elif rank == 0:  # replicated: counted once, whatever the world size
        local, first = t.detach(), 0
    else:
        return 0
    bits = local.reshape(-1).view(_SAME_SIZE_INT[local.element_size()]).to(torch.int64)
    weights = torch.arange(first, first + bits.numel(), dtype=torch.int64) * _ODD_WEIGHT + 1
    return int((bits * weights).sum())


def _first_element(t: DTensor) -> int:
    """The global index of this rank's first element under Shard(0): chunks of ceil(rows / W) rows,
    as `torch.chunk` cuts them, the last ones short or empty."""
    assert t.placements == (Shard(0),), f"expected Shard(0) placements, got {t.placements}"
    rows, ranks, index = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = math.ceil(rows / ranks) if rows else 0
    start = min(index * chunk, rows)
    assert t.to_local().shape[0] == min(chunk, rows - start), "Shard(0) is not cut as torch.chunk cuts"
    return start * (t.numel() // rows if rows else 0)


# -- measuring ----------------------------------------------------------------------------------


def measure_saves(method: Method, state: BenchState, spec: dict[str, Any], expected: list[int],
                  log: EventLog) -> dict[str, Any]:
    """`reps` repetitions of save, wait, fsync, evict, restore, verify; the last run dir is kept."""
    baseline = _baseline_memory()
    edges = Edges(state)
    reps = []
    for i in range(spec["reps"]):
        trim_heap()
        run_dir = fresh_run_dir(Path(spec["run_root"]) / f"rep-{i}", state)
        rep = _save_once(method, state, run_dir, baseline)
        rep.update(_restore_once(method, state, run_dir, spec["cache_mode"], baseline, expected))
        if not rep["verified"]:
            edges.reset(state, expected)
        if i < spec["reps"] - 1:
            remove_run_dir(run_dir, state)
        reps.append(rep)
        log.write({"event": "rep", "rep": i, **rep})
    return {"baseline_rss_mb": baseline / MB, "reps": reps, "kept": str(run_dir)}


def measure_restores(method: Method, state: BenchState, spec: dict[str, Any], expected: list[int],
                     log: EventLog) -> dict[str, Any]:
    """`reps` restores of the snapshot in `spec["run_dir"]`, saved at another world size."""
    baseline = _baseline_memory()
    reps = []
    for i in range(spec["reps"]):
        trim_heap()
        mutate(state)  # so that the second restore, too, has something to undo
        rep = _restore_once(method, state, Path(spec["run_dir"]), spec["cache_mode"], baseline, expected)
        reps.append(rep)
        log.write({"event": "rep", "rep": i, **rep})
    return {"baseline_rss_mb": baseline / MB, "reps": reps}


def _save_once(method: Method, state: BenchState, run_dir: Path, baseline: int) -> dict[str, Any]:
    barrier()
    with RssSampler() as rss:
        start = time.perf_counter()
        wait = method.save(state, run_dir, STEP)
        stall = time.perf_counter() - start
        mutate(state)  # what the next training step would do
        wait()
        barrier()  # every rank's files exist before any rank lists them
        fsync_start = time.perf_counter()
        fsync_tree(run_dir, state.rank, state.world_size)
        barrier()
        end = time.perf_counter()
    written = tree_bytes(run_dir) if state.rank == 0 else None
    return {"stall_s": stall, "total_s": end - start, "fsync_s": end - fsync_start,
            "extra_rss_mb": (rss.peak - baseline) / MB, "bytes_written": written}


def _restore_once(method: Method, state: BenchState, run_dir: Path, cache_mode: str, baseline: int,
                  expected: list[int]) -> dict[str, Any]:
    assert method.restore is not None
    evict(run_dir, state, cache_mode)  # ends in a barrier: every rank starts together
    with RssSampler() as rss:
        start = time.perf_counter()
        method.restore(state, run_dir, STEP)
        seconds = time.perf_counter() - start
    return {"restore_s": seconds, "restore_extra_rss_mb": (rss.peak - baseline) / MB,
            "verified": fingerprints(state) == expected}


def tree_bytes(root: Path) -> int:
    """Bytes of every file under `root` (du --apparent-size)."""
    return sum(os.path.getsize(os.path.join(parent, f)) for parent, _, files in os.walk(root) for f in files)


def _baseline_memory() -> int:
    gc.collect()
    trim_heap()
    return memory_bytes()

