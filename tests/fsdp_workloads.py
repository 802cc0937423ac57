"""FSDP2 runs executed inside `run_ranks` processes (module-level so spawn can import them).

The model has what sharding makes hard: a token embedding tied to the output head, layers whose
first dimension no world size here divides (769 rows: 385/384 on 2 ranks, 257/257/255 on 3), a
bias, and an integer buffer that stays replicated.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dtrain
from dtrain.dist import attach
from dtrain.snapshot import reader
from dtrain.state import make_sharded_state
from dtrain.storage import LocalStorage

VOCAB, WIDTH, HIDDEN = 1003, 256, 769


class TiedModel(torch.nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("seen", torch.zeros(3, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.head(torch.relu(self.down(torch.relu(self.up(self.emb(ids))))))


def build(sharded: bool, seed: int = 0, **sizes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TiedModel(**sizes)
    if sharded:
        fully_shard(model.up)
        fully_shard(model.down)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> None:
    """The same batches on every rank whatever the world size (each rank computes the mean over all)."""
    for step in range(first, first + steps):
        ids = torch.randint(0, model.emb.num_embeddings, (8, 5), generator=torch.Generator().manual_seed(step))
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer, whole (gathered from the shards), by a flat name."""
    out = {f"model/{k}": _whole(v) for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        out.update({f"optimizer/{index}/{k}": _whole(v) for k, v in state.items()})
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's shards of parameters and optimizer state (a tied parameter once)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values())]
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.untyped_storage().data_ptr() not in seen:
            seen.add(local.untyped_storage().data_ptr())
            total += local.numel() * local.element_size()
    return total


class PeakRSS:
    """The largest resident set size of this process while the block runs, above its size at entry."""

    def __init__(self) -> None:
        self.extra = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self._base = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.extra = max(self.extra, _rss() - self._base)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.extra, _rss() - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def save_sharded(run_dir: str, steps: int, sharded: bool = True, file_mb: int = 64,
                 sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Train `steps` steps, save, wait for the commit; the whole state and this rank's peak extra memory."""
    dist.init_process_group("gloo")
    model, optimizer = build(sharded, **(sizes or {}))
    train_steps(model, optimizer, steps)
    state = {"model": model, "optimizer": optimizer}
    snap = dtrain.Snapshotter(run_dir, every_steps=0, file_mb=file_mb)
    snap.restore(state)
    with PeakRSS() as peak:
        snap.close(steps, state)
    return {"full": full_state(model, optimizer), "peak": peak.extra, "local": local_bytes(model, optimizer),
            "rank": dist.get_rank()}


def restore_sharded(run_dir: str, step: int, sharded: bool = True, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Restore into a model built from another seed; the whole state and the restore's peak extra memory."""
    dist.init_process_group("gloo")
    model, optimizer = build(sharded, seed=1, **(sizes or {}))
    make_sharded_state(optimizer)  # the optimizer's own state: not what the restore costs
    live = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with PeakRSS() as peak:
        restored = reader.restore(LocalStorage(Path(run_dir)), step, attach(), into=live)
    model.load_state_dict(restored.objects["model"])
    optimizer.load_state_dict(restored.objects["optimizer"])
    tied = model.head.weight is model.emb.weight
    return {"full": full_state(model, optimizer), "peak": peak.extra, "local": local_bytes(model, optimizer),
            "tied": tied, "restored_is_dtensor": isinstance(optimizer.state_dict()["state"][0]["exp_avg"], DTensor)}


def restore_expecting_error(run_dir: str, step: int) -> str:
    dist.init_process_group("gloo")
    model, optimizer = build(True, seed=1)
    make_sharded_state(optimizer)
    try:
        reader.restore(LocalStorage(Path(run_dir)), step, attach(),
                       into={"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    except dtrain.SnapshotError as e:
        return str(e)
    return ""
