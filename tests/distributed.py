"""Run a function on W real processes joined in a gloo group, and gather what each returns."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """`fn(*args)` on ranks 0..W-1 (torchrun's environment variables set); their return values, by rank.

    Raises naming every rank that failed or did not finish in time; kills the stragglers.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results),
                         daemon=False)  # not daemonic: a rank may start DataLoader workers
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
                outcomes[rank] = (status, value)
            except queue.Empty:
                for r, p in enumerate(procs):  # a rank killed by a signal never reports
                    if r not in outcomes and p.exitcode not in (None, 0):
                        outcomes[r] = ("error", f"process exited with code {p.exitcode} without reporting")
            if any(s == "error" for s, _ in outcomes.values()):
                deadline = min(deadline, time.monotonic() + 30)  # the others may wait on the failed rank
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    missing = [r for r in range(world_size) if r not in outcomes]
    errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
    if missing or errors:
        detail = "".join(f"\n--- rank {r} failed:\n{v}" for r, v in sorted(errors.items()))
        raise AssertionError(f"ranks {missing} did not finish within {timeout}s; {len(errors)} rank(s) failed{detail}")
    return [_from_bytes(outcomes[r][1]) for r in range(world_size)]


def _to_bytes(value: Any) -> bytes:
    # Tensors sent through a queue would be shared by file descriptor, which dies with the rank.
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        results.put((rank, "ok", _to_bytes(fn(*args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
