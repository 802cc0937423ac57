"""`dtrain train` under torchrun in the background, and reading what a run leaves behind.

    launch = Launch(run_dir, settings.train_args(run_dir), log=root / "launch-0.log")
    start = launch.await_start()          # the step it resumed from, or None for a new run
    ...
    launch.await_exit(timeout=120)
    left = launch.leftovers()             # processes of the run still alive after torchrun exited
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
from support.procs import REPO, kill, kill_tree, torchrun_cmd

NPROC = 2
STARTED = re.compile(r"resumed from snapshot step (\d+) \(saved at world size \d+\) at world size \d+|"
                     r"starting a new run at world size \d+")
"""Rank 0's line when training starts: group 1 is the step resumed from, None for a new run."""
STEP = re.compile(r"\[rank 0\] INFO dtrain\.progress: step (\d+) ")
"""Rank 0's line after each step (with `train.log_every_steps=1`): group 1 is the step."""


LEFTOVER_GRACE = 5.0
"""Seconds a run's processes get to vanish after torchrun exited: a forked writer dies with its
worker (`PR_SET_PDEATHSIG`), so anything still there after this is a process that outlived its run."""


@dataclass(frozen=True)
class Settings:
    """The config of one experiment, as `--set` overrides on top of a config file (examples/demo.toml)."""

    overrides: tuple[str, ...]
    config: str = "examples/demo.toml"

    def train_args(self, run_dir: Path, *extra: str) -> list[str]:
        sets = [a for kv in (*self.overrides, *extra) for a in ("--set", kv)]
        return ["train", "--config", self.config, "--run-dir", str(run_dir), *sets]


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

    def leftovers(self, grace: float = LEFTOVER_GRACE) -> list[Leftover]:
        """Once torchrun has exited: the processes of this run still alive `grace` seconds later.

        Each is SIGKILLed once recorded, so that it cannot disturb the next launch on the run dir.
        """
        assert self.proc.poll() is not None, "torchrun is still running: its workers are not leftovers"
        left = await_no_leftovers(self.run_dir, grace)
        for p in left:
            kill(p.pid, signal.SIGKILL)
        return left


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


@dataclass(frozen=True)
class Leftover:
    """A process that runs `dtrain train` on a run dir (a worker, or a writer a worker forked)."""

    pid: int
    ppid: int
    state: str
    """From /proc/PID/stat: R running, S sleeping, D in uninterruptible I/O, T stopped."""
    threads: int
    wchan: str
    """The kernel function it sleeps in: a futex wait in a single-threaded process is a lock that no
    thread is left to release (a child that forked while another thread held it)."""
    stack: str
    """/proc/PID/stack, when this process may read it."""
    cmdline: str

    def __str__(self) -> str:
        stack = f"; kernel stack: {self.stack}" if self.stack else ""
        return (f"pid {self.pid} (ppid {self.ppid}, state {self.state}, {self.threads} thread(s), "
                f"wchan {self.wchan or '-'}{stack}): {self.cmdline}")


def leftovers(run_dir: Path) -> list[Leftover]:
    """Live processes (zombies excluded) whose command line trains on `run_dir`.

    Every worker carries `--run-dir RUN_DIR`, and so does every process it forks (a fork keeps the
    command line), wherever it was reparented: the scan is of /proc, not of torchrun's tree.
    """
    wanted = [b"--run-dir", str(run_dir).encode()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        args = _read(entry / "cmdline", b"").split(b"\0")
        if not any(args[i:i + 2] == wanted for i in range(len(args) - 1)):
            continue
        stat = _read(entry / "stat", b"").decode(errors="replace")
        fields = stat.rsplit(")", 1)[1].split() if ")" in stat else []
        if not fields or fields[0] in ("Z", "X"):  # gone, or dead and waiting to be reaped
            continue
        status = _read(entry / "status", b"").decode(errors="replace")
        threads = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:")), 0)
        stack = " <- ".join(line.split(" ", 1)[-1] for line in
                            _read(entry / "stack", b"").decode(errors="replace").splitlines()[:6])
        found.append(Leftover(int(entry.name), int(fields[1]), fields[0], threads,
                              _read(entry / "wchan", b"").decode(errors="replace"), stack,
                              b" ".join(args).decode(errors="replace").strip()))
    return sorted(found, key=lambda p: p.pid)


def await_no_leftovers(run_dir: Path, grace: float) -> list[Leftover]:
    """Wait up to `grace` seconds for every process training on `run_dir` to go; those still there."""
    deadline = time.monotonic() + grace
    while (left := leftovers(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _read(path: Path, default: bytes) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return default


def cli(*args: str) -> tuple[int, str, str]:
    """`dtrain ARGS` in this process (the CLI's own entry point, without a second torch import):
    its exit code, stdout and stderr."""
    from dtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()
