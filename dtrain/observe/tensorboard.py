"""Rank 0's TensorBoard scalars: every row of `metrics.jsonl`, mirrored into `RUN_DIR/tb/`.

    board = open_board(run_dir)      # once per process, by whoever owns the config (`report.tensorboard`)
    MetricsLog(run_dir / "metrics.jsonl").record(row)   # now also a TensorBoard scalar
    close_board(run_dir)

One curve per tag across restarts: each attempt's writer is opened at its start or resume event
with `purge_step` = the first step it will train. TensorBoard's reader then drops what an earlier
(killed) attempt logged from that step on, so a resumed curve has each step once and never goes
backwards. Every row is flushed at once: a SIGKILL loses nothing already recorded.

Events are text under a tag of their own kind (`events/resume`, `events/preempted`...), since the
reader also drops older entries of a tag when a step arrives out of order.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any

from dtrain.observe.timeline import START_EVENTS

logger = logging.getLogger(__name__)

TB_DIR = "tb"

# metrics.jsonl key -> TensorBoard tag; rows may carry any subset (grad_norm and the timings are optional),
# and other numbers too.
TRAIN_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "samples_per_s": "train/samples_per_s", "step_time_s": "train/step_time_s",
              "data_wait_s": "train/data_wait_s", "world_size": "run/world_size", "epoch": "train/epoch"}
SNAPSHOT_TAGS = {"stall_s": "snapshot/stall_s", "write_s": "snapshot/write_s", "bytes": "snapshot/bytes",
                 "interval_steps": "snapshot/interval_steps"}
NOT_METRICS = {"time", "step", "metrics_step", "event"}

_boards: dict[Path, Board] = {}
_lock = threading.Lock()


class Board:
    """A SummaryWriter that follows the run's attempts (see the module docstring)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        self._lock = threading.Lock()  # the background save thread records commits too

    def record(self, row: dict[str, Any]) -> None:
        step, event = row.get("step"), row.get("event")
        if not isinstance(step, int | float) or isinstance(step, bool):
            return
        step = int(step)
        with self._lock:
            if event in START_EVENTS or self._writer is None:
                self._open(purge_step=step + 1 if event in START_EVENTS else None)
            for tag, value in _scalars(row):
                self._writer.add_scalar(tag, value, step, walltime=row.get("time"))
            if (kind := _event_kind(row)) is not None:
                self._writer.add_text(f"events/{kind}", _describe(row), step, walltime=row.get("time"))
            self._writer.flush()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        if self._writer is not None:
            self._writer.close()
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)


def _scalars(row: dict[str, Any]) -> list[tuple[str, float]]:
    event = row.get("event")
    if event == "snapshot":
        found = [(tag, row[k]) for k, tag in SNAPSHOT_TAGS.items() if k in row]
        return [*found, ("snapshot/failed", 0.0 if row.get("committed") else 1.0)]
    if event is not None:
        return [("run/world_size", row["world_size"])] if "world_size" in row else []
    if "train_loss" in row:  # the known keys by their tags, any other number (a loss scale...) under train/
        return [(TRAIN_TAGS.get(k, f"train/{k}"), v) for k, v in row.items() if k not in NOT_METRICS and _is_number(v)]
    return [(f"val/{k.removeprefix('val_')}", v) for k, v in row.items() if k not in NOT_METRICS and _is_number(v)]


def _event_kind(row: dict[str, Any]) -> str | None:
    """The text tag of an event; a committed snapshot is scalars only, a failed save is an event."""
    event = row.get("event")
    if event == "snapshot":
        return None if row.get("committed") else "save_failed"
    return event


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("time", "event"))


def open_board(run_dir: Path) -> Board:
    """This process's board for `run_dir` (rank 0 only), writing under `RUN_DIR/tb/`."""
    key = Path(run_dir).absolute()
    with _lock:
        if key not in _boards:
            _boards[key] = Board(key / TB_DIR)
        return _boards[key]


def board_for(run_dir: Path) -> Board | None:
    """The open board of `run_dir`, if this process opened one."""
    if not _boards:
        return None
    return _boards.get(Path(run_dir).absolute())


def close_board(run_dir: Path) -> None:
    with _lock:
        board = _boards.pop(Path(run_dir).absolute(), None)
    if board is not None:
        board.close()


@atexit.register
def _close_all() -> None:
    for run_dir in list(_boards):
        close_board(run_dir)
