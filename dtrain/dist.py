"""The process group, from torchrun's environment or for a single process.

Two channels are set up beside the training group:

- `cpu_group`, a gloo group for small CPU-side agreements (preemption flags, restore
  broadcasts); it is the training group itself when that one is gloo already.
- two key-value store clients of their own: `store` for the training thread's agreements
  (`exchange`), `save_store` for the background snapshot thread. A background thread must never
  issue collectives on the training group: they would interleave with the training loop's and
  deadlock. It must not share a store client with the training thread either: a client serves
  one request at a time, so a training thread waiting in `exchange` for a peer would hold up this
  rank's shard report, which that peer's save may be waiting for (a preemption during a save
  deadlocked that way). Store keys carry a per-launch nonce so a restarted group never reads a
  previous attempt's keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

from dtrain.config import AUTO, Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    cpu_group: dist.ProcessGroup | None
    store: dist.Store
    """The training thread's client: `exchange` and other agreements in the loop."""
    save_store: dist.Store
    """The background snapshot thread's client: shard reports and commit outcomes."""
    timeout: timedelta
    nonce: str
    """Random per launch, agreed by all ranks: names this attempt's store keys and pending dirs."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @cached_property
    def is_one_host(self) -> bool:
        """Whether every rank runs on this machine. Asks the store on first use: call it on every rank."""
        return self.world_size == 1 or len(set(self.exchange("hosts", socket.gethostname()))) == 1

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is set on any rank: one small all-reduce, so ranks decide together."""
        if self.world_size == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, buf: torch.Tensor, src: int) -> None:
        """Broadcast a CPU tensor in place over the CPU group."""
        if self.world_size > 1:
            dist.broadcast(buf, src=src, group=self.cpu_group)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def exchange(self, key: str, value: str) -> list[str]:
        """Every rank's `value`, through the store (no collective), in rank order."""
        self.store.set(f"{key}/{self.rank}", value)
        keys = [f"{key}/{r}" for r in range(self.world_size)]
        self.store.wait(keys, self.timeout)
        return [self.store.get(k).decode() for k in keys]


def solo_context() -> DistContext:
    """A context for one process with no process group: `dtrain ckpt` commands and tests."""
    store = dist.HashStore()
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none",
                       cpu_group=None, store=store, save_store=store, timeout=timedelta(seconds=60),
                       nonce=secrets.token_hex(8))


def attach(timeout: timedelta = timedelta(minutes=10)) -> DistContext:
    """A context for a process group the caller already initialized (env:// with MASTER_ADDR/PORT).

    Example::

        dist.init_process_group("gloo")
        writer = SnapshotWriter(LocalStorage(run_dir), attach())
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    nonce = _agree_nonce(cpu_group)
    if world_size == 1 or "MASTER_ADDR" not in os.environ:
        store: dist.Store = dist.HashStore()
        save_store: dist.Store = store
    else:
        store, save_store = (
            dist.PrefixStore(f"dtrain/{nonce}", dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                              is_master=False, timeout=timeout))
            for _ in range(2))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
                       cpu_group=cpu_group, store=store, save_store=save_store, timeout=timeout, nonce=nonce)


def env_world_size() -> int:
    """The world size torchrun announced, known before the group exists (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_device_type(cfg: Config) -> str:
    """`cuda` or `cpu`: what `choose_device` will pick, known before any process group exists."""
    wanted = cfg.train.device
    return "cuda" if wanted == "cuda" or (wanted == AUTO and torch.cuda.is_available()) else "cpu"


def choose_device(cfg: Config, local_rank: int) -> torch.device:
    if planned_device_type(cfg) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: Config) -> DistContext:
    """Join (or, alone, create) the process group; every collective is bounded by dist.timeout_seconds."""
    timeout = timedelta(seconds=cfg.dist.timeout_seconds)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(cfg, local_rank)
    backend = _choose_backend(cfg, device)
    rank, world_size = int(os.environ.get("RANK", "0")), env_world_size()
    group_store, store, save_store = group_stores(rank, timeout)
    dist.init_process_group(backend, store=group_store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    ctx = DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        cpu_group=cpu_group,
        store=store,
        save_store=save_store,
        timeout=timeout,
        nonce=_agree_nonce(cpu_group),
    )
    logger.debug("rank %d/%d joined (%s on %s)", ctx.rank, ctx.world_size, backend, device)
    return ctx


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _choose_backend(cfg: Config, device: torch.device) -> str:
    if cfg.dist.backend != AUTO:
        return cfg.dist.backend
    return "nccl" if device.type == "cuda" else "gloo"


def _agree_nonce(cpu_group: dist.ProcessGroup | None) -> str:
    t = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    dist.broadcast(t, src=0, group=cpu_group)
    return f"{int(t.item()):016x}"


def group_stores(rank: int, timeout: timedelta) -> tuple[dist.Store, dist.Store, dist.Store]:
    """Three clients of a store that belongs to this group alone: for the process group, for the
    training thread, and for the background snapshot thread.

    torchrun keeps one store for the whole job and does not clear it between restarts, so keys a
    dead group wrote (gloo's peer addresses among them) are still there when the next group joins:
    a restarted rank can read its peer's old address and fail with "connectFullMesh ... Connection
    refused", or wait on it. So global rank 0 hosts a fresh store on a free port and publishes
    `port:nonce` in torchrun's store; the others connect and check the nonce, which tells a stale
    announcement from the current one.
    """
    if "MASTER_ADDR" not in os.environ:
        solo = dist.HashStore()
        return solo, solo, solo
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # no torchrun: rank 0 hosts at MASTER_PORT
        first = dist.TCPStore(host, port, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    else:
        first = _fresh_group_store(rank, host, port, timeout)
    clients = [dist.TCPStore(host, first.port, is_master=False, timeout=timeout) for _ in range(2)]
    return first, clients[0], clients[1]


def _fresh_group_store(rank: int, host: str, port: int, timeout: timedelta) -> dist.Store:
    job_store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rank == 0:
        nonce = secrets.token_hex(8)
        fresh = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        fresh.set("nonce", nonce)
        job_store.set(_ANNOUNCE_KEY, f"{fresh.port}:{nonce}")
        return fresh
    return _join_announced(job_store, host, timeout)


_ANNOUNCE_KEY = "dtrain/group_store"


def _join_announced(job_store: dist.Store, host: str, timeout: timedelta) -> dist.Store:
    deadline = time.monotonic() + timeout.total_seconds()
    refused = None
    while True:
        job_store.wait([_ANNOUNCE_KEY], timeout)
        announced = job_store.get(_ANNOUNCE_KEY).decode()
        if announced != refused:
            port, nonce = announced.split(":")
            client = _connect(host, int(port), nonce, timeout)
            if client is not None:
                return client
            refused = announced  # a previous group's: wait for rank 0 to replace it, do not retry it
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 announced no reachable group store within {timeout}; is rank 0 alive?")
        time.sleep(0.1)


def _connect(host: str, port: int, nonce: str, timeout: timedelta) -> dist.Store | None:
    """A client of the store at `host:port` if it is the one holding `nonce`, else None.

    A TCPStore client retries a refused connection for seconds, and the store of a dead group
    refuses at once: a plain connect first tells it in a millisecond, not after two 3 s tries.
    """
    try:
        socket.create_connection((host, port), timeout=1).close()
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=3))
        if client.get("nonce").decode() == nonce:
            client.set_timeout(timeout)
            return client
    except (OSError, RuntimeError, dist.DistStoreError):
        pass
    return None
