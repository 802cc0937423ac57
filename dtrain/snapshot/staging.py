"""How the bytes of a save are held while they are written: copied, or shared copy-on-write.

`copy` (the default): the training thread copies the bytes this rank writes into host buffers
(on CUDA, the device-to-host copy into pinned memory), then a background thread writes them.
The buffers are kept and reused by the next save of the same layout, so after the first save
staging touches no fresh memory (no page faults, no allocator); on CUDA they are pinned once.
They start on page boundaries, so the writer can send them to disk around the page cache.
The stall is one memcpy of this rank's share, and that share stays allocated between saves.

`fork`: the training process forks. The child sees the state exactly as it was at the fork, by
the kernel's copy-on-write, and writes it while the parent trains on; a page is copied only when
training modifies it before the child has written it. The stall is the fork, a few milliseconds
for gigabytes (page tables, not pages). To bound the memory this costs, the child drops (with
`madvise(MADV_DONTNEED)`) every tensor page it will not write, and each piece as soon as it is
written, so modified pages are copied only for the share still to be written; with a memory
budget the parent waits, before training on, until that share is under the budget. A page is
given up only when no byte still to be written lies on it. Tensors in shared memory are copied
instead: copy-on-write does not protect them, so the child would see later steps' bytes. The
child never logs, never touches the process group or CUDA, ignores preemption signals, dies
with its parent (`PR_SET_PDEATHSIG`) and only with it, reports through a pipe and leaves with
`os._exit`; a child that has not reported by the save's deadline is killed.

Fork staging is opt-in: forking a multi-threaded Python process can deadlock the child inside
`os.fork()` itself (CPython's after-fork cleanup waiting on a lock another thread held at the
fork), before it can even learn that its parent died. The deadline kills such a child while the
parent lives; if the parent is killed first, the child is left behind. `copy` has no such mode.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import json
import mmap
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dtrain.errors import SnapshotError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def can_fork(tensors: dict[str, torch.Tensor]) -> bool:
    """Fork staging needs Linux and host memory: a child cannot read CUDA memory."""
    return _libc is not None and all(t.device.type == "cpu" for t in tensors.values())


def byte_view(t: torch.Tensor) -> memoryview:
    """The live bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class StagingBuffers:
    """Host buffers for copy staging, one per file, kept from one save to the next.

    A save reuses the buffer of the same file and size (the layout rarely changes), so staging
    after the first save writes into memory that is already mapped; on CUDA it is pinned, so the
    device-to-host copy runs at full speed without a bounce buffer.
    """

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int, pin: bool) -> torch.Tensor:
        buf = self._held.get(name)
        if buf is None or buf.numel() != nbytes or buf.is_pinned() != pin:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if pin else _page_aligned(nbytes)
            self._held[name] = buf
        return buf

    def keep_only(self, names: set[str]) -> None:
        """Drop the buffers of files this save did not have."""
        self._held = {n: b for n, b in self._held.items() if n in names}


def _page_aligned(nbytes: int) -> torch.Tensor:
    """Host memory on page boundaries, mapped in at once: a write from it can bypass the page cache
    (`O_DIRECT` needs aligned buffers), and the first save does not fault its pages in one by one."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(-1, nbytes, flags=flags)
    return torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive


class PageReleaser:
    """In a forked child: give up the pages of bytes already written (or never to be written here),
    but never a page on which a byte still to be written lies."""

    def __init__(self, to_write: list[memoryview]) -> None:
        spans = sorted(_address_span(v) for v in to_write if len(v))
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]
        self._reach = list(itertools.accumulate(self._ends, max))  # monotonic: bisect finds the first overlap
        self._pending = [True] * len(spans)
        self._index: dict[tuple[int, int], list[int]] = {}
        for i, span in enumerate(spans):
            self._index.setdefault(span, []).append(i)

    def written(self, view: memoryview) -> None:
        """`view`, one of `to_write`, is on disk: release its pages no pending byte shares."""
        if len(view):
            self._pending[self._index[_address_span(view)].pop()] = False
            self.release(view)

    def release(self, view: memoryview) -> None:
        start, end = _address_span(view)
        start, end = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        for lo, hi in self._free_ranges(start, end):
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)

    def _free_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Page-aligned parts of [start, end) that no pending span touches."""
        free, lo = [], start
        i = bisect.bisect_right(self._reach, start)
        while i < len(self._starts) and self._starts[i] < end:
            if self._pending[i] and self._ends[i] > lo:
                hi = self._starts[i] // _PAGE * _PAGE
                if hi > lo:
                    free.append((lo, hi))
                lo = max(lo, -(-self._ends[i] // _PAGE) * _PAGE)
            i += 1
        if end > lo:
            free.append((lo, end))
        return free


def _address_span(view: memoryview) -> tuple[int, int]:
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0
    return addr, addr + len(view)


class ForkedWriter:
    """A child process running `work()` on a copy-on-write image of this process; `wait()` returns what it wrote."""

    def __init__(self, work: Callable[[Callable[[int], None]], dict[str, Any]], held_bytes: int,
                 budget_bytes: int = 0, deadline: float = float("inf")) -> None:
        self._held = mmap.mmap(-1, 8)  # shared with the child: bytes it still holds
        self._held[:] = struct.pack("q", held_bytes)
        read_end, write_end = os.pipe()
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            os.close(read_end)
            self._run_child(work, write_end, parent)
        os.close(write_end)
        self._pipe = read_end
        self.deadline = deadline
        if budget_bytes > 0:
            self._wait_under(budget_bytes, deadline)

    def held_bytes(self) -> int:
        return struct.unpack("q", self._held[:8])[0]

    def _wait_under(self, budget: int, deadline: float) -> None:
        while self.held_bytes() > budget and not _exited(self.pid):
            if time.monotonic() > deadline:
                self.kill()
                raise SnapshotError("the snapshot writer process did not get under snapshot.memory_budget_mb "
                                    "before the save's deadline (snapshot.timeout_seconds); it was killed")
            time.sleep(0.001)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _run_child(self, work: Callable[[Callable[[int], None]], dict[str, Any]], pipe: int, parent: int) -> None:
        code = 0
        try:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            # A scheduler may signal every process of the job (SLURM does): the child finishes the
            # write the parent's emergency snapshot waits for; it dies with the parent, not before.
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            report = work(self._wrote)
        except BaseException as e:  # reported, never raised: the child must not unwind into training code
            report, code = {"error": f"snapshot writer process: {type(e).__name__}: {e}"}, 1
        try:
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(pipe, data):]
        finally:
            os._exit(code)

    def _wrote(self, nbytes: int) -> None:
        self._held[:] = struct.pack("q", self.held_bytes() - nbytes)

    def wait(self) -> dict[str, Any]:
        """The child's report; kills it if it has not reported by the deadline (a stuck disk, a
        child deadlocked in `fork()`), so no save waits forever and no child outlives it."""
        chunks = []
        try:
            while True:
                left = self.deadline - time.monotonic()
                if left <= 0 or not select.select([self._pipe], [], [], min(left, 3600))[0]:
                    if time.monotonic() >= self.deadline:
                        self.kill()
                        raise SnapshotError("the snapshot writer process did not report within the save's "
                                            "deadline (snapshot.timeout_seconds); it was killed")
                    continue
                chunk = os.read(self._pipe, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._pipe)
            _, status = os.waitpid(self.pid, 0)
        if not chunks:
            raise SnapshotError(f"the snapshot writer process died ({_describe(status)}) before reporting")
        return json.loads(b"".join(chunks))


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (wait() does that)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
