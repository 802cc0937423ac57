"""Training runs executed inside `run_ranks` processes (module-level so spawn can import them)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

from dtrain.config import load_config
from dtrain.dist import init_distributed
from dtrain.errors import DTrainError
from dtrain.progress import ProgressLog
from dtrain.snapshot.layout import METRICS
from dtrain.storage import LocalStorage
from dtrain.task import load_task
from dtrain.trainer import Trainer

SMALL = ["task.options.num_samples=480", "task.options.eval_samples=64", "task.options.hidden=32",
         "train.global_batch_size=32", "train.log_every_steps=1000"]


def train(run_dir: str, overrides: list[str], storage: Any = None) -> dict[str, Any]:
    """Train (resuming from `run_dir`); return the final state and the sample ids of each step on this rank."""
    cfg = load_config(None, SMALL + overrides)
    ctx = init_distributed(cfg)
    ledger: dict[int, list[int]] = {}
    progress = ProgressLog(Path(run_dir) / METRICS, cfg.train.steps, 0, enabled=ctx.is_main,
                           every=cfg.train.log_every_steps)
    trainer = Trainer(cfg, load_task(cfg.task), Path(run_dir), ctx, storage=storage, progress=progress,
                      on_batch=lambda step, ids: ledger.__setitem__(step, ids.tolist()))
    error = None
    try:
        result = trainer.fit()
    except DTrainError as e:
        error, result = str(e), None
    return {
        "rank": ctx.rank,
        "error": error,
        "resumed_from": result.resumed_from if result else None,
        "model": whole(trainer.model.state_dict()),
        "optimizer": whole_optimizer(trainer.optimizer.state_dict()),
        "ledger": ledger,
        "rng": torch.get_rng_state(),
        "precision": trainer.amp.state_dict(),
    }


def whole(tensors: dict[str, Any]) -> dict[str, Any]:
    """Copies of a state dict's tensors, sharded ones (FSDP's DTensors) gathered whole on every rank."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in tensors.items()}


def whole_optimizer(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {**state_dict, "state": {i: whole(s) for i, s in state_dict["state"].items()}}


def train_ledgered(run_dir: str, overrides: list[str], ledger: str, kill_before: int | None = None) -> dict[str, Any]:
    """Train, appending each step's sample ids to the file `ledger`.rank<R> as it starts (so a killed
    attempt's record survives it); with `kill_before`, SIGKILL this process before that 0-based step."""
    import os
    import signal

    cfg = load_config(None, SMALL + overrides)
    ctx = init_distributed(cfg)
    path = Path(f"{ledger}.rank{ctx.rank}")

    def on_batch(step: int, ids: torch.Tensor) -> None:
        if step == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        with path.open("a") as record:
            record.write(f"{step} {' '.join(map(str, ids.tolist()))}\n")

    trainer = Trainer(cfg, load_task(cfg.task), Path(run_dir), ctx, on_batch=on_batch)
    result = trainer.fit()
    return {"rank": ctx.rank, "resumed_from": result.resumed_from, "model": whole(trainer.model.state_dict())}


def train_killing_one_rank(run_dir: str, overrides: list[str], ledger: str, kill_rank: int,
                           kill_before: int) -> dict[str, Any]:
    import os

    victim = int(os.environ["RANK"]) == kill_rank
    return train_ledgered(run_dir, overrides, ledger, kill_before if victim else None)


class FailingStorage(LocalStorage):
    """A local disk that reports ENOSPC when `fail_rank` writes a shard of step `fail_step`."""

    def __init__(self, root: str, rank: int, fail_rank: int, fail_step: int) -> None:
        super().__init__(root)
        self.should_fail = rank == fail_rank
        self.marker = f"step_{fail_step:09d}."

    def open_write(self, path: str):
        if self.should_fail and self.marker in path:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        return super().open_write(path)


def train_with_failing_rank(run_dir: str, overrides: list[str], fail_rank: int, fail_step: int) -> dict[str, Any]:
    import os

    storage = FailingStorage(run_dir, int(os.environ["RANK"]), fail_rank, fail_step)
    return train(run_dir, overrides, storage)


class SlowStorage(LocalStorage):
    """A disk that takes `delay` seconds per file written, and records when each save wrote."""

    def __init__(self, root: str, delay: float) -> None:
        super().__init__(root)
        self.delay = delay
        self.writes: list[tuple[float, float]] = []

    def open_write(self, path: str):
        import time

        start = time.monotonic()
        time.sleep(self.delay)
        handle = super().open_write(path)
        self.writes.append((start, time.monotonic()))
        return handle


def train_on_slow_disk(run_dir: str, overrides: list[str], delay: float) -> dict[str, Any]:
    """Train with a slow disk; report how many steps ran while a shard file was being written."""
    import time

    storage = SlowStorage(run_dir, delay)
    step_times: list[float] = []
    cfg = load_config(None, SMALL + overrides)
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, load_task(cfg.task), Path(run_dir), ctx, storage=storage,
                      on_batch=lambda s, ids: step_times.append(time.monotonic()))
    trainer.fit()
    overlapped = sum(any(a <= t <= b for a, b in storage.writes) for t in step_times)
    return {"steps": len(step_times), "overlapped": overlapped, "writes": len(storage.writes)}


def restore_in_place(run_dir: str, step: int, is_one_host: bool) -> dict[str, Any]:
    """Restore `step` into zeroed tensors shaped like the snapshot's, with either read strategy."""
    import torch.distributed as dist

    from dtrain.dist import attach
    from dtrain.snapshot import catalog, reader

    dist.init_process_group("gloo")
    ctx = attach()
    ctx.__dict__["is_one_host"] = is_one_host  # the strategy a multi-machine job would take, on one machine
    storage = LocalStorage(run_dir)
    manifest = catalog.read_manifest(storage, step)
    live = {k.removeprefix("model/"): torch.zeros(e.shape, dtype=torch.float32)
            for k, e in manifest.tensors.items() if k.startswith("model/")}
    restored = reader.restore(storage, step, ctx, into={"model": live})
    model = restored.objects["model"]
    dist.destroy_process_group()
    return {"model": {k: v.clone() for k, v in model.items()},
            "in_place": all(model[k].data_ptr() == live[k].data_ptr() for k in live)}


def train_expecting_error(run_dir: str, overrides: list[str]) -> str:
    """Train; the message of the DTrainError that stops it."""
    cfg = load_config(None, SMALL + overrides)
    ctx = init_distributed(cfg)
    try:
        Trainer(cfg, load_task(cfg.task), Path(run_dir), ctx).fit()
    except DTrainError as e:
        return str(e)
    raise AssertionError("training finished without the expected error")


def save_one_step_twice(first_dir: str, second_dir: str) -> list[str]:
    """One writer saves step 1 into `first_dir`, then step 1 again (other values) into `second_dir`,
    as a step is saved again after its snapshot failed verification; each save's path (it raises
    if a save did not commit)."""
    import torch.distributed as dist

    from dtrain.dist import attach
    from dtrain.snapshot.writer import SnapshotWriter

    dist.init_process_group("gloo")
    writer = SnapshotWriter(LocalStorage(Path(first_dir)), attach(), timeout_seconds=30)
    paths = []
    for value, run_dir in [(1.0, first_dir), (2.0, second_dir)]:
        writer.storage = LocalStorage(Path(run_dir))
        paths.append(writer.save(1, {"model": {"w": torch.full((1000,), value)}}, {}).wait().path)
    return paths
