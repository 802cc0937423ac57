"""`dtrain train` under torchrun in the background, and reading what a run leaves behind.

    launch = Launch(run_dir, settings.train_args(run_dir), log=root / "launch-0.log")
    start = launch.await_start()          # the step it resumed from, or None for a new run
    ...
    launch.await_exit(timeout=120)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.phases import LogWatch
from dtrain.snapshot import layout
from tests.conftest import REPO, torchrun_cmd
from tests.procs import kill, kill_tree

NPROC = 2
STARTED = re.compile(r"resumed from snapshot step (\d+) \(saved at world size \d+\) at world size \d+|"
                     r"starting a new run at world size \d+")
"""Rank 0's line when training starts: group 1 is the step resumed from, None for a new run."""
STEP = re.compile(r"\[rank 0\] INFO dtrain\.report: step (\d+) ")
"""Rank 0's line after each step (with `train.log_every_steps=1`): group 1 is the step."""


@dataclass(frozen=True)
class Settings:
    """The config of one experiment, as `--set` overrides on top of examples/demo.toml."""

    overrides: tuple[str, ...]

    def train_args(self, run_dir: Path, *extra: str) -> list[str]:
        sets = [a for kv in (*self.overrides, *extra) for a in ("--set", kv)]
        return ["train", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *sets]


class Launch:
    """One `torchrun --standalone --nproc_per_node 2` in a session of its own, its output in `log`."""

    def __init__(self, run_dir: Path, args: list[str], log: Path, max_restarts: int = 0) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.metrics_offset = metrics_size(run_dir)
        self.watch = LogWatch(log)
        self.started = time.monotonic()
        with log.open("w") as out:
            self.proc = subprocess.Popen(torchrun_cmd(NPROC, *args, max_restarts=max_restarts), cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def await_start(self, timeout: float = 300) -> int | None:
        """Wait until training starts: the snapshot step it resumed from, or None for a new run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.watch.poll():
                if m := STARTED.search(line):
                    return int(m.group(1)) if m.group(1) else None
            if self.proc.poll() is not None:
                self.watch.poll()
                raise LaunchError(f"torchrun exited {self.proc.returncode} before training started", self)
            time.sleep(0.02)
        raise LaunchError(f"training did not start within {timeout:g}s", self)

    def await_exit(self, timeout: float) -> int | None:
        """torchrun's exit code; None (and the whole tree SIGKILLed) if it outlived `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid)
            self.proc.wait()
            return None
        finally:
            self.watch.poll()

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM torchrun, as a scheduler would: it passes SIGTERM on, the workers save and exit 75."""
        kill(self.pid, signal.SIGTERM)
        return self.await_exit(timeout)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl rows written since this launch started."""
        return read_metrics(self.run_dir, self.metrics_offset)

    def tail(self, lines: int = 40) -> str:
        self.watch.poll()
        return "\n".join(self.watch.lines[-lines:])


class LaunchError(AssertionError):
    def __init__(self, message: str, launch: Launch) -> None:
        super().__init__(f"{message} (log {launch.watch.path}):\n{launch.tail()}")


def metrics_size(run_dir: Path) -> int:
    try:
        return (run_dir / layout.METRICS).stat().st_size
    except FileNotFoundError:
        return 0


def read_metrics(run_dir: Path, offset: int = 0) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl from byte `offset`; a line torn by a kill is skipped."""
    try:
        with open(run_dir / layout.METRICS, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    rows = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def last_step(rows: list[dict[str, Any]]) -> int | None:
    """The last training step these rows record (log_every_steps=1 records every step)."""
    steps = [r["step"] for r in rows if "train_loss" in r]
    return steps[-1] if steps else None


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the `step_*` dirs that hold a manifest, oldest first (what resume may choose from)."""
    snaps = run_dir / layout.SNAPSHOTS
    names = [p.name for p in snaps.iterdir()] if snaps.is_dir() else []
    steps = [layout.parse_step_dir(n) for n in names if (snaps / n / layout.MANIFEST).exists()]
    return sorted(s for s in steps if s is not None)


def cli(*args: str) -> tuple[int, str, str]:
    """`dtrain ARGS` in this process (the CLI's own entry point, without a second torch import):
    its exit code, stdout and stderr."""
    from dtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()
