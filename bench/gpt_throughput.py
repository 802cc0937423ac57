"""The GPT example's training speed with a snapshot every N steps against none, at 1 and 2 ranks.

    .venv/bin/python bench/gpt_throughput.py                       # 3 interleaved reps, about 8 minutes
    .venv/bin/python bench/gpt_throughput.py --reps 5 --every 5 --steps 60

Each repetition runs `dtrain train --config examples/gpt.toml` under torchrun, as a user does, once
per (world size, interval), interleaved so that a noisy neighbour hits every configuration alike.
Evaluation, which each snapshot runs for its metrics, is cut to one held-out window so that what is
measured is the snapshot. Steps per second are taken from rank 0's metrics.jsonl between the end of step `--skip` and the last
step, so start-up and the first compilation of kernels are left out; the saves in that window are
counted from the log. It prints the medians, each repetition's figure in brackets, and the ratio
with snapshots to without.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def steps_per_second(run_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "train_loss" in r}
    last = max(times)
    return (last - skip) / (times[last] - times[skip])


def one_run(nproc: int, every: int, args: argparse.Namespace, where: Path) -> float:
    run_dir = where / f"gpt-{nproc}-{every}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dtrain", "train", "--config", "examples/gpt.toml", "--run-dir", str(run_dir),
           "--set", f"train.steps={args.steps}", "--set", "train.log_every_steps=1",
           "--set", f"snapshot.every_steps={every}", "--set", "train.eval_every_steps=0",
           # a snapshot evaluates for its metrics; one held-out window keeps that out of the save's cost
           "--set", "task.options.eval_samples=1",
           "--set", f"train.precision={args.precision}", *args.set]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    rate = steps_per_second(run_dir, args.skip)
    shutil.rmtree(run_dir, ignore_errors=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the window at the start")
    parser.add_argument("--every", type=int, default=10, help="the snapshot interval measured against none")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--set", action="append", default=[], help="more --set overrides for the run")
    args = parser.parse_args()
    args.set = [x for item in args.set for x in ("--set", item)]
    configs = [(int(n), every) for n in args.ranks.split(",") for every in (0, args.every)]
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="dtrain-gpt-bench-") as tmp:
        for rep in range(args.reps):
            for config in configs:
                rates[config].append(one_run(*config, args, Path(tmp)))
                print(f"rep {rep} ranks {config[0]} every {config[1] or 'never'}: {rates[config][-1]:.3f} steps/s",
                      file=sys.stderr)
    print(f"\nGPT example ({args.precision}), steps/s from step {args.skip} to {args.steps}, "
          f"medians of {args.reps} interleaved runs\n")
    print(f"| ranks | no snapshots | every {args.every} steps | ratio |")
    print("|---|---|---|---|")
    for n in sorted({n for n, _ in configs}):
        none, some = rates[(n, 0)], rates[(n, args.every)]
        ratio = statistics.median(some) / statistics.median(none)
        print(f"| {n} | {statistics.median(none):.3f} [{' '.join(f'{r:.3f}' for r in none)}] "
              f"| {statistics.median(some):.3f} [{' '.join(f'{r:.3f}' for r in some)}] | {ratio:.3f} |")


if __name__ == "__main__":
    main()
