"""How the bytes of a save are held while they are written: copied, or shared copy-on-write.

`copy`: the training thread copies the bytes this rank writes into host buffers (on CUDA, this
is the device-to-host copy), then a background thread writes them. The stall is one memcpy of
this rank's share.

`fork`: the training process forks. The child sees the state exactly as it was at the fork, by
the kernel's copy-on-write, and writes it while the parent trains on; a page is copied only when
training modifies it before the child has written it. The stall is the fork, a few milliseconds
for gigabytes (page tables, not pages). To bound the memory this costs, the child drops (with
`madvise(MADV_DONTNEED)`) every tensor page it will not write, and each piece as soon as it is
written, so modified pages are copied only for the share still to be written; with a memory
budget the parent waits, before training on, until that share is under the budget. The child
never logs, never touches the process group or CUDA, ignores preemption signals, dies with
its parent (`PR_SET_PDEATHSIG`) and only with it, reports through a pipe and leaves with `os._exit`.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
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


def release(view: memoryview) -> None:
    """In a forked child: give up the whole pages under `view`, so the parent can modify them for free."""
    if len(view) == 0:
        return
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + len(view)) // _PAGE * _PAGE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


class ForkedWriter:
    """A child process running `work()` on a copy-on-write image of this process; `report()` waits for it."""

    def __init__(self, work: Callable[[Callable[[int], None]], dict[str, Any]], held_bytes: int,
                 budget_bytes: int = 0) -> None:
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
        if budget_bytes > 0:
            self._wait_under(budget_bytes)

    def held_bytes(self) -> int:
        return struct.unpack("q", self._held[:8])[0]

    def _wait_under(self, budget: int) -> None:
        while self.held_bytes() > budget and not _exited(self.pid):
            time.sleep(0.001)

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

    def report(self) -> dict[str, Any]:
        chunks = []
        while chunk := os.read(self._pipe, 1 << 16):
            chunks.append(chunk)
        os.close(self._pipe)
        _, status = os.waitpid(self.pid, 0)
        if not chunks:
            raise SnapshotError(f"the snapshot writer process died ({_describe(status)}) before reporting")
        return json.loads(b"".join(chunks))


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (report() does that)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
