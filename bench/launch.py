"""Start the ranks of a bench launch, watch them, and collect what each wrote.

All cases of one world size run in one launch, on one state built once per rank. A case that
crashes or hangs is recorded as failed with each rank's error, and a new launch runs the cases
after it, so one broken library costs its own rows and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from bench import worker

logger = logging.getLogger("bench")

_POLL_S = 1.0
ALL_CORES = "all"
SPARE_CORE = "spare"
SCENARIOS = (ALL_CORES, SPARE_CORE)


@dataclass(frozen=True)
class Settings:
    state_bytes: int
    reps: int
    windows: int  # timed throughput windows per variant and scenario, interleaved round by round
    intervals: int  # snapshot intervals per timed throughput window
    every: int  # steps between snapshots; 0: auto, from dtrain's write time and `write_share`
    write_share: float
    train_methods: list[str]  # variants of the throughput case, "none" first
    scenarios: list[str]  # training scenarios: ALL_CORES, SPARE_CORE
    threads: int  # torch threads per rank; 0: cores / world size
    cache_mode: str  # "drop_caches" or "fadvise"
    case_timeout_s: float  # a case that writes nothing for this long is killed as hung
    collective_timeout_s: float


def run_cases(cases: list[str], world_size: int, settings: Settings, work_dir: Path) -> dict[str, Any]:
    """Run `cases` on `world_size` ranks; returns the launch's state info and each case's per-rank
    results (or a failure)."""
    results: dict[str, Any] = {}
    info: dict[str, Any] = {}
    remaining = list(cases)
    attempt = 0
    while remaining:
        log_dir = work_dir / f"log-{attempt}"
        log_dir.mkdir(parents=True)
        failure = _launch(remaining, world_size, settings, work_dir, log_dir)
        events = [read_events(log_dir / f"rank-{r}.jsonl") for r in range(world_size)]
        info = info or _state_info(events)
        done = _completed(remaining, events)
        results.update(done)
        remaining = [c for c in remaining if c not in done]
        if failure is None or not remaining:
            break
        broken, remaining = remaining[0], remaining[1:]
        results[broken] = {"status": "failed", "note": failure_note(failure, events)}
        logger.warning("%s on %d ranks failed: %s", broken, world_size, results[broken]["note"])
        if not info:  # the state itself could not be built: nothing else can run
            for case in remaining:
                results[case] = {"status": "failed", "note": results[broken]["note"]}
            break
        attempt += 1
    return {"state": info, "cases": results}


def _launch(cases: list[str], world_size: int, settings: Settings, work_dir: Path,
            log_dir: Path) -> str | None:
    spec = {**asdict(settings), "cases": cases, "world_size": world_size, "port": free_port(),
            "threads": threads_per_rank(settings, world_size),
            "scenario_threads": scenario_threads(settings, world_size), "case_dir": str(work_dir),
            "log_dir": str(log_dir)}
    ctx = mp.start_processes(worker.main, args=(spec,), nprocs=world_size, join=False,
                             start_method="spawn")
    return watch(ctx, log_dir, settings.case_timeout_s)


def threads_per_rank(settings: Settings, world_size: int) -> int:
    return settings.threads or max(1, (os.cpu_count() or 1) // world_size)


def scenario_threads(settings: Settings, world_size: int) -> dict[str, int | None]:
    """Torch threads per rank while training is timed, per scenario: every core (`--threads`, or
    cores / ranks), or one core left free for the writer (cores - 1 over the ranks; None where the
    ranks need every core)."""
    cores = os.cpu_count() or 1
    spare = max(1, (cores - 1) // world_size)
    threads = {ALL_CORES: threads_per_rank(settings, world_size),
               SPARE_CORE: spare if spare * world_size < cores else None}
    return {name: threads[name] for name in settings.scenarios}


def watch(ctx: mp.ProcessContext, log_dir: Path, timeout_s: float) -> str | None:
    """None when every rank exited cleanly; otherwise why not."""
    progress, last_change = -1, time.monotonic()
    while True:
        try:
            if ctx.join(timeout=_POLL_S):
                return None
        except ProcessException as e:
            return str(e).strip().splitlines()[0]
        size = sum(p.stat().st_size for p in log_dir.glob("*.jsonl"))
        if size != progress:
            progress, last_change = size, time.monotonic()
        elif time.monotonic() - last_change > timeout_s:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            return f"no progress for {timeout_s:.0f} s; ranks killed (hang)"


def _completed(cases: list[str], events: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The cases every rank finished: case -> {"per_rank": [result of rank 0, rank 1, ...]}."""
    per_rank = [{e["case"]: e for e in rank_events if e["event"] == "result"} for rank_events in events]
    return {c: {"per_rank": [r[c] for r in per_rank]} for c in cases if all(c in r for r in per_rank)}


def _state_info(events: list[list[dict[str, Any]]]) -> dict[str, Any]:
    found = [e for e in events[0] if e["event"] == "state"] if events else []
    return {k: found[0][k] for k in ("nbytes", "width", "build_s")} if found else {}


def failure_note(failure: str, events: list[list[dict[str, Any]]]) -> str:
    errors = []
    for rank, rank_events in enumerate(events):
        for e in rank_events:
            if e["event"] == "error":
                lines = [ln for ln in e["error"].strip().splitlines() if ln.strip()]
                errors.append(f"rank {rank}: {lines[-1][:300]}")
    return "; ".join(errors) if errors else failure


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
