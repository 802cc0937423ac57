"""What a user sees while training: a progress bar or periodic lines on rank 0, metrics.jsonl, and
the same rows as TensorBoard scalars (`report.tensorboard`, see `dtrain.observe.tensorboard`)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dtrain.observe import tensorboard

logger = logging.getLogger(__name__)


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line, appended; a no-op where `path` is None (ranks but 0).

    Each row also goes to the run dir's TensorBoard board when this process opened one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()  # the background save thread records each commit
        self._warned = False

    def record(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        row = {"time": round(time.time(), 3), **row}
        try:
            with self._lock, self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full or read-only disk: the snapshot layer reports it; the log must not stop training
            if not self._warned:
                logger.warning("cannot append to %s (%s): metrics are not recorded until it is writable", self.path, e)
                self._warned = True
            return
        self._warned = False
        board = tensorboard.board_for(self.path.parent)
        if board is not None:
            try:
                board.record(row)
            except Exception as e:  # a TensorBoard problem must never stop training
                logger.warning("TensorBoard: could not record %s under %s: %s", row, board.log_dir, e)


class ProgressLog:
    """Rank 0's progress bar (on a terminal) or log lines (otherwise), and the metrics log."""

    def __init__(self, metrics_path: Path | None, total_steps: int, start_step: int, enabled: bool,
                 every: int, tensorboard_log: bool = False) -> None:
        """`tensorboard_log`: mirror every row of the run dir's metrics into `RUN_DIR/tb/` as well."""
        self.log = MetricsLog(metrics_path if enabled else None)
        self._board_dir = metrics_path.parent if enabled and tensorboard_log and metrics_path is not None else None
        if self._board_dir is not None:
            tensorboard.open_board(self._board_dir)
        self.every = every
        self.enabled = enabled
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

    def step(self, step: int, values: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)}, refresh=False)
        elif self.enabled and step % self.every == 0:
            logger.info("step %d  %s", step, "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in values.items()))

    def record(self, row: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (rank 0 only)."""
        self.log.record(row)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._board_dir is not None:
            tensorboard.close_board(self._board_dir)
