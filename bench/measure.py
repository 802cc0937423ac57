"""What one rank measures: a method's repetitions (stall, total, extra RSS, restore), dtrain's
restore at another world size, and the tools they share with `bench/throughput.py`.

Each repetition writes to a fresh run dir and deletes it afterwards. Ranks start every timed phase
together (a barrier), and time it on their own clock; `bench/report.py` takes the slowest rank.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.methods import Method
from bench.state import BenchState, mutate, state_tensors

MB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_RSS_INTERVAL_S = 0.005
_KEPT_ELEMENTS = 1024  # `mutate` changes this many elements at the head and at the tail
_SAMPLE_STRIDE = 4099  # prime, so that samples do not line up with rows


def trim_heap() -> None:
    """Hand the heap's free memory back to the kernel (glibc's malloc_trim).

    Without it, what one method freed stays resident, the next method reuses it, and its extra RSS
    reads as zero. Called before every baseline reading; a no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def memory_bytes() -> int:
    """This process's resident memory plus what its child processes hold privately.

    A snapshot written by a forked child shares the parent's pages until the parent changes one;
    the kernel then gives the parent a new page and the child keeps the old one. The parent's RSS
    does not grow, so counting only it would hide that copy: the children's private pages are it.
    """
    return rss_bytes() + sum(_private_bytes(pid) for pid in _children())


def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:  # the thread ended
            continue
    return pids


def _private_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            lines = f.read().splitlines()
    except OSError:  # the child exited
        return 0
    kib = [int(line.split()[1]) for line in lines if line.startswith((b"Private_Clean:", b"Private_Dirty:"))]
    return sum(kib) * 1024


class RssSampler:
    """The peak memory (`memory_bytes`) while the `with` block runs, sampled by a thread (every 5 ms).

    `cpu_s` is the CPU time the sampling thread itself took, so that a caller counting the
    process's CPU can leave the harness's share out.

    Example:
        with RssSampler() as rss:
            work()
        print(rss.peak)
    """

    def __init__(self, interval_s: float = _RSS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.peak = memory_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_bytes())

    def _run(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, memory_bytes())
        self.cpu_s = time.thread_time() - started


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync_tree(root: Path, rank: int, world_size: int) -> None:
    """fsync every file and directory under `root` (and `root`), split between the ranks.

    torchsnapshot 0.1.0 never fsyncs; the other methods do it for their files. Doing it here for
    all of them makes *total* mean the same thing everywhere: the bytes are on disk.
    """
    paths = sorted(_walk(root))
    for i, path in enumerate(paths):
        if i % world_size == rank:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _walk(root: Path) -> list[str]:
    out = [str(root)]
    for parent, dirs, files in os.walk(root):
        out += [os.path.join(parent, n) for n in dirs + files]
    return out


def can_drop_caches() -> bool:
    """Whether this process may drop the page cache (root, /proc/sys writable)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def evict(run_dir: Path, state: BenchState, cache_mode: str) -> None:
    """Make the next read of `run_dir` come from the disk, not the page cache.

    The files are fsynced already (`fsync_tree`), so their pages are clean and dropping them needs
    no global `sync`. Only the page cache goes ("1"): dentries and inodes stay, which spares the
    rest of the machine and costs a restore a few metadata reads at most.
    """
    barrier()
    if cache_mode == "drop_caches" and state.rank == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    elif cache_mode == "fadvise":
        for i, path in enumerate(sorted(_walk(run_dir))):
            if i % state.world_size == state.rank and os.path.isfile(path):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
    barrier()


class Pristine:
    """Samples of the state as built, to verify restores and to undo `mutate`.

    It keeps what `mutate` changes (the head and tail of every tensor) and every 4099th element: a
    restore that did nothing, loaded a tensor into the wrong place or kept values written after
    save returned shows up in them, at a cost of microseconds instead of a pass over the state.
    """

    def __init__(self, state: BenchState) -> None:
        self._samples = [_samples(t).clone() for _, t in state_tensors(state)]
        self._edges = [(t.view(-1)[:_KEPT_ELEMENTS].clone(), t.view(-1)[-_KEPT_ELEMENTS:].clone())
                       for _, t in state_tensors(state)]

    def is_intact(self, state: BenchState) -> bool:
        return all(torch.equal(_samples(t), s) and torch.equal(t.view(-1)[:_KEPT_ELEMENTS], head)
                   and torch.equal(t.view(-1)[-_KEPT_ELEMENTS:], tail)
                   for (_, t), s, (head, tail) in zip(state_tensors(state), self._samples, self._edges,
                                                      strict=True))

    @torch.no_grad()
    def reset(self, state: BenchState) -> None:
        for (_, t), (head, tail) in zip(state_tensors(state), self._edges, strict=True):
            t.view(-1)[:_KEPT_ELEMENTS].copy_(head)
            t.view(-1)[-_KEPT_ELEMENTS:].copy_(tail)
        if not self.is_intact(state):
            raise RuntimeError("the bench state changed beyond what mutate() touches; "
                               "later measurements would not be on the same state")


def _samples(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)[::_SAMPLE_STRIDE]


def measure_method(method: Method, state: BenchState, case_dir: Path, reps: int, cache_mode: str,
                   pristine: Pristine) -> dict[str, Any]:
    """`reps` repetitions of save, wait, fsync, evict, restore, verify on this rank."""
    gc.collect()
    trim_heap()
    baseline = memory_bytes()
    out: list[dict[str, Any]] = []
    for i in range(reps):
        trim_heap()
        run_dir = fresh_run_dir(case_dir / f"{method.name}-rep{i}", state)
        out.append(_measure_save(method, state, run_dir, baseline))
        if method.restore is not None:
            out[-1].update(_measure_restore(method, state, run_dir, cache_mode, baseline, pristine))
        if not out[-1].get("verified"):
            pristine.reset(state)
        remove_run_dir(run_dir, state)
    return {"baseline_rss_mb": baseline / MB, "reps": out}


def _measure_save(method: Method, state: BenchState, run_dir: Path, baseline: int) -> dict[str, Any]:
    barrier()
    with RssSampler() as rss:
        start = time.perf_counter()
        wait = method.save(state, run_dir, 1)
        stall = time.perf_counter() - start
        mutate(state)  # what the next training step would do
        wait()
        fsync_start = time.perf_counter()
        if method.is_durable:
            barrier()  # every rank's files exist before any rank lists them
            fsync_start = time.perf_counter()
            fsync_tree(run_dir, state.rank, state.world_size)
            barrier()
        end = time.perf_counter()
    return {"stall_s": stall, "total_s": end - start, "fsync_s": end - fsync_start,
            "extra_rss_mb": (rss.peak - baseline) / MB}


def _measure_restore(method: Method, state: BenchState, run_dir: Path, cache_mode: str,
                     baseline: int, pristine: Pristine) -> dict[str, Any]:
    assert method.restore is not None
    if method.is_durable:
        evict(run_dir, state, cache_mode)
    barrier()
    try:
        with RssSampler() as rss:
            start = time.perf_counter()
            method.restore(state, run_dir, 1)
            seconds = time.perf_counter() - start
    except NotImplementedError as e:
        return {"restore_s": None, "restore_note": str(e)}
    return {"restore_s": seconds, "restore_extra_rss_mb": (rss.peak - baseline) / MB,
            "verified": pristine.is_intact(state)}


def fresh_run_dir(run_dir: Path, state: BenchState) -> Path:
    if state.rank == 0:
        run_dir.mkdir(parents=True)
    barrier()
    return run_dir


def remove_run_dir(run_dir: Path, state: BenchState) -> None:
    barrier()
    if state.rank == 0:
        shutil.rmtree(run_dir)
    barrier()


def measure_reshard(state: BenchState, case_dir: Path, reps: int, cache_mode: str,
                    pristine: Pristine) -> dict[str, Any]:
    """dtrain's restore at another world size, both ways, `reps` times each: saved by every rank
    and restored by rank 0 alone (W -> 1), and saved by rank 0 alone and restored by every rank
    (1 -> W), as a job restarted on fewer or more processes does."""
    out: dict[str, list[dict[str, Any]]] = {"to_one": [], "from_one": []}
    for i in range(reps):
        for way in out:
            run_dir = fresh_run_dir(case_dir / f"reshard-{way}-rep{i}", state)
            out[way].append(_reshard_once(state, run_dir, way == "from_one", cache_mode, pristine))
            remove_run_dir(run_dir, state)
    return out


def _reshard_once(state: BenchState, run_dir: Path, from_one: bool, cache_mode: str,
                  pristine: Pristine) -> dict[str, Any]:
    from bench import dtrain_cases

    alone = state.rank == 0  # the one process of the 1-rank side
    barrier()
    if alone or not from_one:
        wait = dtrain_cases.save(state, run_dir, 1, world_size=1 if from_one else state.world_size)
        mutate(state)
        wait()
    else:
        mutate(state)  # so that a restore that skipped this rank shows
    barrier()
    fsync_tree(run_dir, state.rank, state.world_size)
    evict(run_dir, state, cache_mode)
    out: dict[str, Any] = {"restore_s": None, "verified": None}
    if alone or from_one:
        start = time.perf_counter()
        dtrain_cases.restore(state, run_dir, 1, world_size=state.world_size if from_one else 1)
        out = {"restore_s": time.perf_counter() - start, "verified": pristine.is_intact(state)}
    if not out["verified"]:
        pristine.reset(state)
    return out
