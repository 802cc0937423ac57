"""Starting dtrain under torchrun, and finding and killing the processes a launcher started, as a
scheduler or a failure would."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain", *args]


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", *extra, "-m", "dtrain", *args]


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return sorted(found)


def workers(agent_pid: int, timeout: float = 60.0) -> list[int]:
    """The worker processes of a torchrun agent that run dtrain (waits until they exist)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in children(agent_pid) if b"dtrain" in _cmdline(p)]
        if pids:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"torchrun agent {agent_pid} started no dtrain worker within {timeout}s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        found += kids
        frontier = kids
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it: torchrun starts workers in sessions of their own."""
    for p in [pid, *descendants(pid)]:
        kill(p, signal.SIGKILL)


def kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def worker_ranks(agent_pid: int, world_size: int, timeout: float = 120.0) -> dict[int, int]:
    """{rank: pid} of a torchrun agent's dtrain workers, from each one's RANK (waits for all of them)."""
    def found() -> dict[int, int]:
        ranks = ranks_now(agent_pid)
        return ranks if len(ranks) == world_size else {}
    return wait_for(found, timeout, f"{world_size} dtrain workers of torchrun agent {agent_pid}", interval=0.02)


def ranks_now(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the dtrain workers a torchrun agent has right now (none while it restarts them)."""
    return {r: p for p in children(agent_pid) if b"dtrain" in _cmdline(p) and (r := rank_of(p)) is not None}


def rank_of(pid: int) -> int | None:
    """The RANK in a process's environment, or None."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def freeze(pids: list[int]) -> None:
    """SIGSTOP each process: its state (and what it left on disk) holds still until `thaw` or SIGKILL."""
    for p in pids:
        kill(p, signal.SIGSTOP)


def thaw(pids: list[int]) -> None:
    for p in pids:
        kill(p, signal.SIGCONT)
