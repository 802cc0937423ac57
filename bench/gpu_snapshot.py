"""What a snapshot of device-resident training state costs: dtrain beside `torch.save` and DCP `async_save`.

    .venv/bin/python bench/gpu_snapshot.py --device cuda --state-gb 4      # launch/ci/gpu-check.sh runs this
    .venv/bin/python bench/gpu_snapshot.py --device cpu --state-gb 0.05    # the same logic on the CPU

The state is `bench.state`'s MLP built on the device and its Adam state after one step (parameters
a third of the bytes). One process, world size 1. For each method, `--reps` saves at successive
steps into one run dir (so dtrain's pinned host buffers are reused after the first save, as in a
training job), each followed by a change to every tensor, as the next step would make:

- stall: until `save` returns and training may change the state again;
- total: until the snapshot is complete and every file and directory under the run dir is fsynced.

The first save and the median of the rest are printed; `--out` gets the JSON. After dtrain's last
save the snapshot is restored and compared with the state as it was saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import fsync_tree  # noqa: E402
from bench.state import DEPTH, width_for  # noqa: E402
from dtrain.dist import solo_context  # noqa: E402
from dtrain.snapshot import reader  # noqa: E402
from dtrain.snapshot.writer import SnapshotWriter  # noqa: E402
from dtrain.storage.local import LocalStorage  # noqa: E402

Wait = Callable[[], None]


def build(device: torch.device, state_bytes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = width_for(state_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width, device=device) for _ in range(DEPTH)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(8, width, device=device)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values()]
    return sum(t.nbytes for t in tensors)


def touch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What the next step does to the state: change every tensor in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
        for s in optimizer.state.values():
            s["exp_avg"].mul_(0.9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtrain_method(run_dir: Path) -> Callable[[nn.Module, torch.optim.Optimizer, int], Wait]:
    writer = SnapshotWriter(LocalStorage(run_dir), solo_context())  # one writer: its host buffers are reused

    def save(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Wait:
        pending = writer.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, per_rank={})
        return pending.wait

    return save


def torch_save_method(run_dir: Path) -> Callable[[nn.Module, torch.optim.Optimizer, int], Wait]:
    def save(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Wait:
        with open(run_dir / f"step_{step:09d}.pt", "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        return lambda: None

    return save


def dcp_async_method(run_dir: Path) -> Callable[[nn.Module, torch.optim.Optimizer, int], Wait]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def save(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Wait:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(run_dir / f"step_{step:09d}"))
        return lambda: future.result() and None

    return save


METHODS = {"dtrain": dtrain_method, "torch_save": torch_save_method, "dcp_async_save": dcp_async_method}


def measure(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, reps: int,
            device: torch.device) -> list[dict[str, float]]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    save = METHODS[name](run_dir)
    rows = []
    for step in range(1, reps + 1):
        sync(device)
        start = time.perf_counter()
        wait = save(model, optimizer, step)
        stall = time.perf_counter() - start
        touch(model, optimizer)
        wait()
        fsync_tree(run_dir, 0, 1)
        rows.append({"stall_s": stall, "total_s": time.perf_counter() - start})
    return rows


def check_dtrain_restore(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, step: int) -> None:
    """The last dtrain snapshot holds the state as it was when its save started (one `touch` ago)."""
    saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k in saved:
            saved[k] -= 1e-3  # undo the touch after the save: what the snapshot must hold
    restored = reader.restore(LocalStorage(run_dir), step, solo_context())
    for k, expected in saved.items():
        got = restored.objects["model"][k].cpu()
        if not torch.allclose(got, expected, rtol=0, atol=1e-6):
            raise SystemExit(f"gpu_snapshot: FAILED: dtrain's snapshot of step {step} does not hold the saved {k}")


def init_group(device: torch.device) -> None:
    """A one-process group: DCP's async_save needs one (with a CPU backend for its background work)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--state-gb", type=float, default=4.0, help="parameters plus Adam state, GB (default 4)")
    p.add_argument("--reps", type=int, default=3, help="saves per method (default 3)")
    p.add_argument("--only", default=",".join(METHODS), help=f"methods, comma separated, of {', '.join(METHODS)}")
    p.add_argument("--tmp-dir", type=Path, default=REPO / "tmp" / "gpu-snapshot")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_snapshot: no CUDA device", file=sys.stderr)
        return 2
    init_group(device)
    model, optimizer = build(device, int(args.state_gb * 1e9))
    nbytes = state_bytes(model, optimizer)
    print(f"state: {nbytes / 1e9:.2f} GB on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    results: dict[str, Any] = {"device": str(device), "state_bytes": nbytes, "reps": args.reps, "methods": {}}
    print(f"{'method':<16} {'first stall s':>14} {'first total s':>14} {'stall s (next)':>15} {'total s (next)':>15}")
    for name in args.only.split(","):
        rows = measure(name, model, optimizer, args.tmp_dir / name, args.reps, device)
        if name == "dtrain":
            check_dtrain_restore(model, optimizer, args.tmp_dir / name, args.reps)
        rest = rows[1:] or rows
        med = {k: statistics.median(r[k] for r in rest) for k in ("stall_s", "total_s")}
        results["methods"][name] = {"first": rows[0], "median_of_rest": med, "reps": rows}
        print(f"{name:<16} {rows[0]['stall_s']:>14.3f} {rows[0]['total_s']:>14.3f} {med['stall_s']:>15.3f} "
              f"{med['total_s']:>15.3f}", flush=True)
        shutil.rmtree(args.tmp_dir / name, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
