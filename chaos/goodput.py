"""Goodput under a Poisson killer, for several snapshot intervals.

    python -m chaos.run --only goodput --seconds 90 --mean-interval 10 --intervals 3,200,auto

For each snapshot interval (a small fixed one, a large fixed one, and "auto" with
`snapshot.mtbf_seconds` set to the killer's mean interval), two runs of the same config, each for
the same wall time T from the launch:

    fault-free  no kills
    chaos       `torchrun --max-restarts 1000`; a killer SIGKILLs a random worker at Poisson moments
                (exponential gaps with the given mean; seeded, the same gaps and victims for every
                interval); a moment that comes while torchrun restarts the workers waits until they
                train again, so every kill interrupts training

At T torchrun gets SIGTERM, as from a scheduler: it passes it on and the workers save that step and
exit 75. Useful steps = the step the run could resume from then (its newest committed snapshot);
goodput = useful steps / T, against the fault-free run of the same config. Steps replayed =
over each restart, the last step finished before it minus the step it resumed from (rank 0's log,
one line a step). Then the run that stopped behind is continued without kills to the other's
step, both are exported with `dtrain ckpt export` and the bytes compared: same world size and
steps, so they must be equal.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.launch import STARTED, STEP, Launch, Settings, committed_steps
from support.procs import REPO, kill, ranks_now

BASE = (
    "train.steps=1000000", "snapshot.keep_last=2", "snapshot.keep_best=0", "snapshot.keep_every=0",
    "snapshot.file_mb=4", "task.options.hidden=768", "train.log_every_steps=1",
)
MAX_RESTARTS = 1000
_COMMIT = re.compile(r"snapshot step (\d+) committed")
_AUTO = re.compile(r"every_steps=auto: (\d+) steps")
_FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank")  # torchrun: a worker group failed


@dataclass
class RunResult:
    """One timed run: what it achieved in `seconds` of wall time."""

    useful_steps: int
    seconds: float
    kills: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since launch, rank) of each SIGKILL."""
    restarts: int = 0
    replayed: list[int] = field(default_factory=list)
    saves: int = 0
    auto_intervals: list[int] = field(default_factory=list)
    """Under `every_steps = "auto"`: the interval chosen after each measured save."""

    @property
    def goodput(self) -> float:
        return self.useful_steps / self.seconds


@dataclass
class IntervalResult:
    interval: str
    free: RunResult
    chaos: RunResult
    compared_at: int = 0
    bit_exact: bool | None = None

    @property
    def efficiency(self) -> float:
        return self.chaos.goodput / self.free.goodput if self.free.goodput else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "efficiency": round(self.efficiency, 4),
                "free_goodput": round(self.free.goodput, 3), "chaos_goodput": round(self.chaos.goodput, 3)}


def settings(interval: str, mean_interval: float) -> Settings:
    every = '"auto"' if interval == "auto" else interval
    return Settings((*BASE, f"snapshot.every_steps={every}", f"snapshot.mtbf_seconds={mean_interval:g}"))


def measure(root: Path, interval: str, seconds: float, mean_interval: float, seed: int,
            say: Callable[[str], None] = print) -> IntervalResult:
    """Fault-free and chaos runs of one snapshot interval, then the bit-for-bit comparison."""
    cfg = settings(interval, mean_interval)
    free = timed_run(root / f"{interval}-free", cfg, seconds, None, say)
    say(f"  every_steps={interval:<5} fault-free: {free.useful_steps} steps in {seconds:g}s")
    chaos = timed_run(root / f"{interval}-chaos", cfg, seconds, Killer(random.Random(seed), mean_interval), say)
    say(f"  every_steps={interval:<5} chaos:      {chaos.useful_steps} steps, {len(chaos.kills)} kills, "
        f"{chaos.restarts} restarts, {sum(chaos.replayed)} steps replayed")
    result = IntervalResult(interval, free, chaos)
    result.compared_at, result.bit_exact = compare_weights(root, interval, cfg, say)
    return result


def timed_run(root: Path, cfg: Settings, seconds: float, killer: Killer | None,
              say: Callable[[str], None]) -> RunResult:
    run_dir = root / "run"
    launch = Launch(run_dir, cfg.train_args(run_dir), root.with_suffix(".log"), max_restarts=MAX_RESTARTS)
    try:
        kills = killer.run(launch, seconds) if killer else _sleep_until(launch.started + seconds)
        if launch.proc.poll() is not None:
            raise AssertionError(f"torchrun exited {launch.proc.returncode} before the window ended:\n{launch.tail()}")
        code = launch.stop()
        if code is None:
            say(f"  note: {run_dir} did not stop within 120s of SIGTERM; its process tree was killed")
    finally:
        if launch.proc.poll() is None:
            launch.await_exit(0)
    steps = committed_steps(run_dir)
    result = RunResult(steps[-1] if steps else 0, seconds, kills)
    result.restarts, result.replayed, result.saves = _from_log(launch.watch.lines)
    result.auto_intervals = [int(m.group(1)) for line in launch.watch.lines if (m := _AUTO.search(line))]
    return result


def _sleep_until(moment: float) -> list[tuple[float, int]]:
    time.sleep(max(0.0, moment - time.monotonic()))
    return []


class Killer:
    """SIGKILLs a random worker at the moments of a Poisson process (exponential gaps, seeded).

    A moment that comes while torchrun is still restarting the workers waits until they train
    again (rank 0 logged the start of training): every kill then interrupts training, and a slow
    restart is not killed over and over before it can do any work.
    """

    def __init__(self, rng: random.Random, mean_interval: float) -> None:
        self.rng, self.mean = rng, mean_interval

    def run(self, launch: Launch, seconds: float) -> list[tuple[float, int]]:
        """Kill until `seconds` after the launch."""
        end, kills = launch.started + seconds, []
        moment, rank = launch.started + self.rng.expovariate(1 / self.mean), self.rng.randrange(2)
        starts_seen = 0
        while time.monotonic() < end and launch.proc.poll() is None:
            launch.watch.poll()
            training = _starts(launch.watch.lines) > starts_seen
            pid = ranks_now(launch.pid).get(rank) if training and time.monotonic() >= moment else None
            if pid is not None and kill(pid, 9):
                kills.append((round(time.monotonic() - launch.started, 2), rank))
                starts_seen = _starts(launch.watch.lines)
                moment = time.monotonic() + self.rng.expovariate(1 / self.mean)
                rank = self.rng.randrange(2)
            time.sleep(0.02)
        return kills


def _starts(lines: list[str]) -> int:
    return sum(1 for line in lines if STARTED.search(line))


def _from_log(lines: list[str]) -> tuple[int, list[int], int]:
    """(worker-group restarts, steps replayed at each resume, commits), from torchrun's and rank 0's log."""
    restarts = sum(1 for line in lines if _FAILED.search(line))
    starts, replayed, last, commits = 0, [], 0, 0
    for line in lines:
        if m := STARTED.search(line):
            if starts:
                replayed.append(last - int(m.group(1) or 0))
            starts += 1
            last = int(m.group(1) or 0)
        elif m := STEP.search(line):
            last = int(m.group(1))
        elif _COMMIT.search(line):
            commits += 1
    return restarts, replayed, commits


def compare_weights(root: Path, interval: str, cfg: Settings, say: Callable[[str], None]) -> tuple[int, bool]:
    """Continue the run that is behind, without kills, to the other's step; compare exported bytes."""
    dirs = {kind: root / f"{interval}-{kind}" / "run" for kind in ("free", "chaos")}
    newest = {kind: (committed_steps(d) or [0])[-1] for kind, d in dirs.items()}
    target = max(newest.values())
    for kind, run_dir in dirs.items():
        if newest[kind] < target:
            launch = Launch(run_dir, cfg.train_args(run_dir, f"train.steps={target}"),
                            root / f"{interval}-{kind}-finish.log")
            code = launch.await_exit(600)
            if code != 0:
                raise AssertionError(f"continuing {run_dir} to step {target} exited {code}:\n{launch.tail()}")
    exported = [export(d, root / f"{interval}-{kind}.safetensors") for kind, d in dirs.items()]
    same = exported[0] == exported[1]
    say(f"  every_steps={interval:<5} weights at step {target}: {'bit-for-bit equal' if same else 'DIFFERENT'}")
    return target, same


def export(run_dir: Path, out: Path) -> bytes:
    done = subprocess.run([sys.executable, "-m", "dtrain", "ckpt", "export", str(run_dir), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"dtrain ckpt export {run_dir} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return out.read_bytes()
