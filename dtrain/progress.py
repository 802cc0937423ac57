"""What a user sees while training: a progress bar or periodic lines on rank 0, and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line, appended; a no-op where `path` is None (ranks but 0)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


class ProgressLog:
    """Rank 0's progress bar (on a terminal) or log lines (otherwise), and the metrics log."""

    def __init__(self, metrics_path: Path | None, total_steps: int, start_step: int, enabled: bool,
                 every: int) -> None:
        self.log = MetricsLog(metrics_path if enabled else None)
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
