"""What one rank measures in training: timed windows with a snapshot every N steps, per scenario.

A window is `every x intervals` training steps with a snapshot at the start of each interval, and
it ends when its last snapshot is complete. Per window each rank records its wall seconds, the
stall of each save and its CPU seconds: user + system of all its threads (a writer thread
included) and of its children that have exited and been reaped (a forked writer, which dtrain's
fork staging waits for with `waitpid` before the window ends). `bench/report.py` subtracts the
window without snapshots of the same round: what is left, per save, is what a save costs training.

Rounds are interleaved: one window of every variant in every scenario, then the next round, so
load that changes during the run moves all of them alike.

A scenario is the number of torch threads training runs on: `all` uses every core, `spare` leaves
one free for the writer (the shape of a GPU node, whose host has cores to spare while the model
computes on the device). `bench/launch.py` decides the threads; each scenario gets its own
interval, since a step's time depends on its threads.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.measure import MB, RssSampler, barrier, fresh_run_dir, remove_run_dir, trim_heap
from bench.methods import Method, Wait
from bench.state import BenchState, train_steps

NO_SNAPSHOTS = "none"
_PROBE_STEPS = 3
# While training is timed, sample memory rarely: reading a forked writer's smaps_rollup walks its
# page tables, and every 5 ms that would take CPU from the training it measures. A copy-on-write
# peak lasts as long as a write, seconds, so 0.1 s still finds it.
_TRAINING_RSS_INTERVAL_S = 0.1


def usage() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process's threads and of its reaped
    children. Minor faults count first touches of fresh memory and copy-on-write copies."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return cpu, own.ru_minflt + children.ru_minflt


class EveryNSteps:
    """The snapshot hook of a window: a save before step 1 and after every `every`-th step that
    leaves `every` steps after it, so a window of k x `every` steps holds exactly k snapshots; the
    previous one is waited for before the next, and the last at the end. Records each save's stall."""

    def __init__(self, method: Method, state: BenchState, run_dir: Path, every: int, steps: int) -> None:
        self.method, self.state, self.run_dir = method, state, run_dir
        self.every, self.steps = every, steps
        self.stalls: list[float] = []
        self._pending: Wait | None = None

    def on_step(self, step: int) -> None:
        if step % self.every == 0 and step + self.every <= self.steps:  # step 0: before the first
            self.finish()
            start = time.perf_counter()
            self._pending = self.method.save(self.state, self.run_dir, step)
            self.stalls.append(time.perf_counter() - start)

    def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()


def measure_training(methods: list[Method | None], state: BenchState, case_dir: Path, windows: int,
                     scenario_threads: dict[str, int | None], settings: dict[str, Any],
                     dtrain_save: dict[str, Any] | None) -> dict[str, Any]:
    """`windows` rounds; in each, one window of every method (None: no snapshots) in every scenario.

    `settings` holds `every`, `write_share` and `intervals` (see `choose_interval`). Returns, per
    scenario, its threads, interval and steps, and per method its windows (see `timed_window`).
    """
    threads_before = torch.get_num_threads()
    try:
        plans = {name: _plan(state, threads, settings, dtrain_save) for name, threads in scenario_threads.items()}
        out = {name: {**plan, "variants": {_name(m): {"status": "ok", "windows": []} for m in methods}}
               for name, plan in plans.items()}
        for i in range(windows):
            for name, plan in plans.items():
                if plan["status"] != "ok":
                    continue
                torch.set_num_threads(plan["threads"])
                for method in methods:
                    _record_window(out[name]["variants"], method, state, case_dir / f"train-{name}-{_name(method)}-{i}",
                                   plan)
        return {"scenarios": out}
    finally:
        torch.set_num_threads(threads_before)


def _plan(state: BenchState, threads: int | None, settings: dict[str, Any],
          dtrain_save: dict[str, Any] | None) -> dict[str, Any]:
    if threads is None:
        return {"status": "skipped", "threads": None,
                "note": f"no core left free: {state.world_size} rank(s) need a thread each on {os.cpu_count()} cores"}
    torch.set_num_threads(threads)
    interval = choose_interval(state, settings["every"], settings["write_share"], dtrain_save)
    return {"status": "ok", "threads": threads, **interval, "steps": interval["every"] * settings["intervals"]}


def _record_window(variants: dict[str, dict[str, Any]], method: Method | None, state: BenchState, run_dir: Path,
                   plan: dict[str, Any]) -> None:
    name = _name(method)
    if variants[name]["status"] != "ok":
        return
    try:
        variants[name]["windows"].append(timed_window(method, state, run_dir, plan["steps"], plan["every"]))
    except NotImplementedError as e:
        variants[name] = {"status": "skipped", "note": str(e)}


def timed_window(method: Method | None, state: BenchState, run_dir: Path, steps: int,
                 every: int) -> dict[str, Any]:
    """One window on this rank: `seconds`, `saves`, `stall_s` (the mean over its saves; None
    without snapshots), `cpu_s` (the memory sampler's own left out), `minor_faults` and
    `peak_mem_mb`."""
    run_dir = fresh_run_dir(run_dir, state)
    try:
        train_steps(state, 1)  # warm-up, untimed
        gc.collect()
        trim_heap()
        hook = EveryNSteps(method, state, run_dir, every, steps) if method is not None else None
        barrier()
        with RssSampler(_TRAINING_RSS_INTERVAL_S) as memory:
            cpu_start, faults_start = usage()
            if hook is None:
                seconds = train_steps(state, steps)
            else:
                seconds = train_steps(state, steps, hook.on_step, hook.finish)
            cpu_end, faults_end = usage()
        stalls = hook.stalls if hook is not None else []
        return {"seconds": seconds, "saves": len(stalls), "stall_s": statistics.fmean(stalls) if stalls else None,
                "cpu_s": cpu_end - cpu_start - memory.cpu_s, "minor_faults": faults_end - faults_start,
                "peak_mem_mb": memory.peak / MB}
    finally:
        remove_run_dir(run_dir, state)


def choose_interval(state: BenchState, every: int, write_share: float,
                    dtrain_save: dict[str, Any] | None) -> dict[str, Any]:
    """The steps between snapshots at the current torch threads: `every`, or (0, auto) the number
    in which dtrain's write takes `write_share` of the interval, from the median total of its save
    case in this launch and a timed training step. Every rank takes the slowest rank's figures."""
    train_steps(state, 1)  # warm-up, untimed
    barrier()
    step_s = _slowest(train_steps(state, _PROBE_STEPS) / _PROBE_STEPS)
    if every:
        return {"every": every, "step_s": step_s}
    if dtrain_save is None or dtrain_save.get("status") != "ok":
        raise RuntimeError("--every auto needs dtrain's save case to have run first in this launch")
    write_s = _slowest(statistics.median(rep["total_s"] for rep in dtrain_save["reps"]))
    return {"every": max(1, math.ceil(write_s / (write_share * step_s))), "write_s": write_s, "step_s": step_s}


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _name(method: Method | None) -> str:
    return method.name if method is not None else NO_SNAPSHOTS
