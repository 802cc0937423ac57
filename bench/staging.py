"""The stall of a save in a running job, by staging mode: what training waits for, save after save.

    python -m bench.staging --state-gb 0.5 --saves 6

`make bench`'s save table times each repetition in a fresh run dir: the first save of a job, whose
copy-staging buffers are new. A job saves many times, and from the second save on copy staging
writes into buffers that are already mapped. This times `--saves` saves of one model in one run
dir per mode (the first reported apart), beside `torch.save` + fsync of the same state, in one
process, interleaved round by round so that a noisy neighbour hits every mode alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dtrain.dist import solo_context
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-gb", type=float, default=0.5, help="parameters of the model, GiB (default 0.5)")
    parser.add_argument("--saves", type=int, default=6, help="saves per mode (default 6)")
    args = parser.parse_args()
    width = 4096
    layers = max(1, round(args.state_gb * (1 << 30) / (width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        writers = {mode: SnapshotWriter(LocalStorage(Path(tmp) / mode), solo_context(), staging=mode)
                   for mode in ("copy", "fork")}
        stalls: dict[str, list[float]] = {"copy": [], "fork": [], "torch.save+fsync": []}
        for step in range(1, args.saves + 1):
            for mode, writer in writers.items():
                started = time.perf_counter()
                pending = writer.save(step, {"model": model.state_dict()}, {})
                stalls[mode].append(time.perf_counter() - started)
                pending.wait()
            stalls["torch.save+fsync"].append(_torch_save(model, Path(tmp) / f"torch-{step}.pt"))
    print(f"{layers * width * width * 4 / (1 << 30):.2f} GiB, {args.saves} saves each, seconds")
    print(f"{'staging':<18} {'first':>8} {'median of the rest':>20}")
    for mode, times in stalls.items():
        print(f"{mode:<18} {times[0]:>8.3f} {statistics.median(times[1:]):>20.3f}")


def _torch_save(model: torch.nn.Module, path: Path) -> float:
    started = time.perf_counter()
    with path.open("wb") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


if __name__ == "__main__":
    main()
