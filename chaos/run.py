"""`make chaos`: crash-consistency trials, then goodput under a Poisson killer; a table, and results.json.

    python -m chaos.run                                   # defaults: 200 trials, 3 x 2 runs of 90 s (~45 min)
    python -m chaos.run --quick                           # ~10 min: 24 trials, 3 x 2 runs of 40 s
    python -m chaos.run --only crash --trials 40 --seed 7 # replay the kill plan of seed 7
    python -m chaos.run --only crash --workload tied --staging fork  # one workload, one staging
    python -m chaos.run --only s3crash --s3-trials 20     # the snapshots in a bucket (SeaweedFS)
    python -m chaos.run --only goodput --seconds 60 --mean-interval 20 --intervals 2,25,50,auto

Exit status 1 when a trial found a violation or weights differed; the seed to replay is printed first.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chaos import crash, goodput, phases, s3crash

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)  # before dtrain's CLI, so its in-process calls stay quiet
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    work = Path(args.work or tempfile.mkdtemp(prefix="dtrain-chaos-"))
    say(f"chaos: seed {seed} (replay: python -m chaos.run --seed {seed} ...), work dir {work}")
    results: dict[str, Any] = {"seed": seed, "args": vars(args)}
    ok = True
    if args.only in (None, "crash"):
        workloads = tuple(dict.fromkeys(args.workload or crash.WORKLOADS))
        stagings = tuple(dict.fromkeys(args.staging or crash.STAGINGS))
        report = crash.CrashHarness(work / "crash", seed, args.trials, say=say, workloads=workloads,
                                    stagings=stagings).run()
        results["crash"] = report.to_json()
        print(crash_table(report), flush=True)
        ok &= not report.violations
    if args.only in (None, "s3crash"):
        trials = s3crash.S3CrashHarness(work / "s3crash", seed, args.s3_trials, say=say).run()
        results["s3crash"] = s3crash.summary(trials)
        print(s3crash.table(trials), flush=True)
        ok &= not results["s3crash"]["violations"]
    if args.only in (None, "goodput"):
        rows = [goodput.measure(work / "goodput", i, args.seconds, args.mean_interval, seed, say=say)
                for i in args.intervals.split(",")]
        results["goodput"] = {"seconds": args.seconds, "mean_interval": args.mean_interval,
                              "intervals": [r.to_json() for r in rows]}
        print(goodput_table(rows, args.seconds, args.mean_interval), flush=True)
        ok &= all(r.bit_exact for r in rows)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    say(f"results written to {args.out}")
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        say(f"kept {work} for inspection; replay with --seed {seed}")
    return 0 if ok else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200, help="crash-consistency trials (default 200)")
    p.add_argument("--seconds", type=float, default=90, help="wall time of each goodput run (default 90)")
    p.add_argument("--mean-interval", type=float, default=10,
                   help="mean seconds between kills; also snapshot.mtbf_seconds for auto (default 10)")
    p.add_argument("--intervals", default="3,200,auto",
                   help="snapshot.every_steps values to compare: small, large, auto (default 3,200,auto)")
    p.add_argument("--seed", type=int, help="seed of every random choice (default: a fresh one, printed)")
    p.add_argument("--only", choices=["crash", "s3crash", "goodput"], help="run one part")
    p.add_argument("--s3-trials", type=int, default=20,
                   help="crash trials with the snapshots in a bucket (SeaweedFS on 127.0.0.1; default 20)")
    p.add_argument("--workload", action="append", choices=list(crash.WORKLOADS),
                   help="what the crash trials train; repeat for several (default: all of them, in turn)")
    p.add_argument("--staging", action="append", choices=list(crash.STAGINGS),
                   help="snapshot.staging of the crash trials; repeat for several (default: all of them, in turn)")
    p.add_argument("--quick", action="store_true", help="24 trials and 40 s goodput runs")
    p.add_argument("--work", help="where runs go (default: a temp dir, removed when all passed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default chaos/results.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.seconds, args.s3_trials = min(args.trials, 24), min(args.seconds, 40), min(args.s3_trials, 5)
    return args


def crash_table(report: crash.CrashReport) -> str:
    rows = [f"\ncrash consistency: {len(report.trials)} trials, seed {report.seed}, {report.seconds / 60:.1f} min; "
            f"snapshot every {crash.EVERY} steps, replay bound 2k = {report.bound}",
            f"{'phase at the kill':<18} {'trials':>6} {'rank 0':>6} {'rank 1':>6} {'aimed here':>10} "
            f"{'replay max':>10} {'median':>6} {'violations':>10}"]
    for phase, trials in report.by_phase().items():
        rows.append(_crash_row(phase, trials, report.trials))
    for kind, values in (("workload", crash.WORKLOADS), ("staging", crash.STAGINGS)):
        for value in values:
            trials = [t for t in report.trials if getattr(t, kind) == value]
            if trials and len(trials) < len(report.trials):
                rows.append(_crash_row(f"({value})", trials, report.trials))
    rows.append(_crash_row("all", report.trials, report.trials))
    if report.litter():
        rows.append(f"left in snapshots/ by kills (removed by the next start): {', '.join(report.litter())}")
    rows += [f"VIOLATION {v}" for v in report.violations]
    return "\n".join(rows)


def _crash_row(name: str, trials: list[crash.Trial], every: list[crash.Trial]) -> str:
    replayed = [t.replayed for t in trials if t.replayed is not None]
    aimed = [t for t in every if t.target == name]
    hit = f"{sum(t.phase == name for t in aimed)}/{len(aimed)}" if name in phases.PHASES and name != phases.STEP else "-"
    return (f"{name:<18} {len(trials):>6} {sum(t.victim_rank == 0 for t in trials):>6} "
            f"{sum(t.victim_rank == 1 for t in trials):>6} {hit:>10} {max(replayed, default='-')!s:>10} "
            f"{(format(statistics.median(replayed), 'g') if replayed else '-'):>6} "
            f"{sum(len(t.violations) for t in trials):>10}")


def goodput_table(rows: list[goodput.IntervalResult], seconds: float, mean: float) -> str:
    best = max(rows, key=lambda r: r.chaos.goodput)
    lines = [f"\ngoodput: {seconds:g} s per run, SIGKILL at Poisson moments (mean {mean:g} s); "
             f"steps/s = useful steps / wall time",
             f"{'every_steps':<12} {'fault-free':>10} {'chaos':>7} {'goodput':>8} {'kills':>5} {'restarts':>8} "
             f"{'saves':>5} {'replayed sum/max':>16} {'weights at step':>15}"]
    for r in rows:
        replayed = f"{sum(r.chaos.replayed)}/{max(r.chaos.replayed, default=0)}"
        exact = f"{'equal' if r.bit_exact else 'DIFFER'} @{r.compared_at}"
        lines.append(f"{r.interval + (' *' if r is best else ''):<12} {r.free.goodput:>10.2f} {r.chaos.goodput:>7.2f} "
                     f"{r.efficiency:>8.0%} {len(r.chaos.kills):>5} {r.chaos.restarts:>8} {r.chaos.saves:>5} "
                     f"{replayed:>16} {exact:>15}")
    lines.append(f"* best goodput under faults: every_steps={best.interval}")
    chosen = [n for r in rows for n in r.chaos.auto_intervals]
    if chosen:
        lines.append(f"auto chose {statistics.median(chosen):g} steps (median of the {len(chosen)} intervals it logged; "
                     f"{min(chosen)} to {max(chosen)})")
    return "\n".join(lines)


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
