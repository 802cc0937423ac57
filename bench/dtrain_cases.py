"""dtrain's side of `make bench`: fill in `save` and `restore`; the harness does the rest.

Until they are implemented, both raise NotImplementedError and the table shows the dtrain rows as
skipped, with every ratio in `bench/results.json` left null.

The contract, the same one every baseline in `bench/methods.py` follows:

- Both are called on every rank at the same time, inside a process group that is already up
  (gloo on 127.0.0.1, the torchrun variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set).
  `state.module` is the model (DDP's inner module when world_size > 1), `state.optimizer` its Adam,
  identical on every rank. `state_tensors(state)` in `bench/state.py` lists every tensor.
- `run_dir` is the same existing directory on every rank, on the repository's filesystem, empty
  before the first save. Write anywhere under it.
- `save` returns when training may change the parameters again: the seconds it takes are the
  *stall*. The harness changes the head and tail of every tensor right after it returns, then calls
  the returned `wait()`, which blocks until the snapshot is committed on this rank. *total* is
  until `wait()` returns on every rank plus an fsync of every file and directory under `run_dir`
  (near zero when `wait()` already made them durable).
- `restore` runs after the page cache was dropped and loads the snapshot of `step` into
  `state.module` and `state.optimizer` in place. The harness compares the result with the state as
  it was when `save` was called; a mismatch is reported in the table.
- In the throughput run, `save` is called every N steps with the same `run_dir` and increasing
  `step`; the harness calls the previous `wait()` before the next `save` and after the last step.
  Training all-reduces on the default process group meanwhile, so a background thread must not
  use it (a store, or a group of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.state import BenchState


def save(state: BenchState, run_dir: Path, step: int) -> Callable[[], None]:
    """Start a dtrain snapshot of `state` at `step` under `run_dir`; return its wait().

    Example:
        wait = save(state, Path("tmp/bench-x/rep-0"), step=1)
        wait()  # committed and durable
    """
    raise NotImplementedError("dtrain case not implemented yet (bench/dtrain_cases.py save)")


def restore(state: BenchState, run_dir: Path, step: int) -> None:
    """Load the committed snapshot of `step` under `run_dir` into `state`, in place."""
    raise NotImplementedError("dtrain case not implemented yet (bench/dtrain_cases.py restore)")
