"""How a restarted group finds its own store in torchrun's job store, past the dead group's."""

from __future__ import annotations

import threading
from datetime import timedelta

import torch.distributed as dist

from dtrain.dist import _ANNOUNCE_KEY, _connect, _join_announced
from tests.distributed import free_port

HOST = "127.0.0.1"
TIMEOUT = timedelta(seconds=30)


def _fresh_store(nonce: str) -> dist.TCPStore:
    store = dist.TCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    store.set("nonce", nonce)
    return store


def test_connect_accepts_only_a_live_store_holding_the_nonce() -> None:
    live = _fresh_store("cafe")
    assert _connect(HOST, free_port(), "cafe", TIMEOUT) is None
    assert _connect(HOST, live.port, "beef", TIMEOUT) is None  # a live store of another group
    client = _connect(HOST, live.port, "cafe", TIMEOUT)
    assert client is not None and client.get("nonce") == b"cafe"


def test_a_restarted_rank_passes_over_the_dead_groups_announcement_and_joins_the_new_one() -> None:
    job = dist.TCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    job.set(_ANNOUNCE_KEY, f"{free_port()}:0ld0ld")  # left by the killed group: nothing listens there now
    new_rank0_ready = threading.Event()
    hosted: list[dist.TCPStore] = []

    def new_rank0() -> None:
        new_rank0_ready.wait(30)
        hosted.append(_fresh_store("n3w"))
        job.set(_ANNOUNCE_KEY, f"{hosted[0].port}:n3w")

    threading.Thread(target=new_rank0, daemon=True).start()
    client = _join_announced(_ReleasingOnRead(job, new_rank0_ready), HOST, TIMEOUT)
    assert client.get("nonce") == b"n3w"
    assert client.port == hosted[0].port


class _ReleasingOnRead:
    """The job store, as a restarted rank sees it when the new rank 0 is slower: the announcement
    is replaced only after the stale one was read."""

    def __init__(self, store: dist.Store, read: threading.Event) -> None:
        self.store, self.read = store, read

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self.store.wait(keys, timeout)

    def get(self, key: str) -> bytes:
        value = self.store.get(key)
        self.read.set()
        return value
