"""dtrain's side of `make bench`: the same save/restore contract every baseline follows.

- Both are called on every rank at the same time, inside a process group that is already up
  (gloo on 127.0.0.1, the torchrun variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set).
  `state.module` is the model (DDP's inner module when world_size > 1), `state.optimizer` its Adam,
  identical on every rank.
- `save` returns when training may change the parameters again: the seconds it takes are the
  *stall*. The harness changes the head and tail of every tensor right after it returns, then calls
  the returned `wait()`, which blocks until the snapshot is committed.
- `restore` runs after the page cache was dropped and loads the snapshot of `step` into
  `state.module` and `state.optimizer` in place.

dtrain is used as a training job uses it: one `SnapshotWriter` per process (at most one save in
flight, the next save waits for the previous), default staging (`auto`: copy into host
buffers reused from one save to the next, so every save but a process's first is a job's steady
state; each repetition's run dir is new, the writer and its buffers are not), the replicated model and optimizer spread over the ranks, and the commit protocol in full
(store barrier, manifest, rename, `latest`). `world_size` lets the resharding case save or restore
with one process of a larger group, as a job restarted on fewer processes would.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from bench.state import BenchState
from dtrain.dist import DistContext, attach, solo_context
from dtrain.snapshot import reader
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage.local import LocalStorage

_writers: dict[int, SnapshotWriter] = {}


@cache
def _group_context() -> DistContext:
    return attach()


def _context(state: BenchState, world_size: int | None) -> DistContext:
    """The whole group, or (world_size=1) this process alone."""
    if world_size is None or world_size == state.world_size:
        return _group_context()
    if world_size != 1:
        raise ValueError(f"world_size={world_size}: only the whole group ({state.world_size}) or 1 is supported")
    return solo_context()


def _writer(run_dir: Path, ctx: DistContext) -> SnapshotWriter:
    """This process's writer for `ctx`'s world size, pointed at `run_dir` (every earlier save was waited for)."""
    if ctx.world_size not in _writers:
        _writers[ctx.world_size] = SnapshotWriter(LocalStorage(run_dir), ctx)
    writer = _writers[ctx.world_size]
    if writer.storage.root != run_dir:
        writer.storage = LocalStorage(run_dir)
    return writer


def save(state: BenchState, run_dir: Path, step: int, world_size: int | None = None) -> Callable[[], None]:
    """Start a dtrain snapshot of `state` at `step` under `run_dir`; return its wait().

    Example:
        wait = save(state, Path("tmp/bench-x/rep-0"), step=1)
        wait()  # committed and durable
    """
    writer = _writer(run_dir, _context(state, world_size))
    pending = writer.save(step, {"model": state.module.state_dict(), "optimizer": state.optimizer.state_dict()},
                          per_rank={})

    def wait() -> None:
        pending.wait()  # raises SnapshotError when the snapshot was not committed

    return wait


def restore(state: BenchState, run_dir: Path, step: int, world_size: int | None = None) -> None:
    """Load the committed snapshot of `step` under `run_dir` into `state`, in place: as a restart
    does, reading straight into the live tensors (`load_state_dict` then finds them in place)."""
    live = {"model": state.module.state_dict(), "optimizer": state.optimizer.state_dict()}
    restored = reader.restore(LocalStorage(run_dir), step, _context(state, world_size), into=live)
    state.module.load_state_dict(restored.objects["model"])
    state.optimizer.load_state_dict(restored.objects["optimizer"])
