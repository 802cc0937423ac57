"""`make bench`: what a snapshot costs, dtrain beside torch.save, torchsnapshot, DCP and the floors.

Usage:

    .venv/bin/python bench/run.py                                 # 1 GiB state, 3 reps, 1 and 2 ranks
    .venv/bin/python bench/run.py --state-gb 0.1 --reps 3         # quick run, ~15 min on 2 cores
    .venv/bin/python bench/run.py --state-gb 0.1 --intervals 0    # no training tables, ~50 s
    .venv/bin/python bench/run.py --ranks 2 --only torch_save,dtrain --out /tmp/r.json

Every method snapshots the same state (an MLP and its Adam state after one step, built once per
rank per launch), repetition after repetition, each into a fresh run dir under `--tmp-dir` that
is deleted afterwards. Per method and world size it reports the median over repetitions of:

    stall    seconds until save returns and training may change the parameters
    total    seconds until the snapshot is complete on every rank and fsynced
    extra mem  peak memory above the state's own: the process's RSS plus its children's private
             pages (a forked writer's copy-on-write originals); also measured while training
    restore  seconds to load it back into the live state, page cache dropped first

then dtrain's restore at another world size (saved on 2 ranks, restored on 1, and the reverse),
and training with a snapshot every N steps, N chosen so that writing a snapshot takes about 10%
of the interval (`--every auto`), in two scenarios: every core training, and one core left free
for the writer. Per method it reports steps per second, the stall, and what a save costs training:
the seconds and CPU seconds a window with snapshots takes beyond the same window without, per
save (medians of `--windows` interleaved windows, their spread beside). The tables go to stdout,
the raw figures and ratios to `--out` (bench/results.json). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import recovery, report  # noqa: E402
from bench.launch import SCENARIOS, Settings, run_cases, scenario_threads, threads_per_rank  # noqa: E402
from bench.measure import can_drop_caches  # noqa: E402
from bench.methods import METHODS  # noqa: E402

logger = logging.getLogger("bench")

GIB = 1 << 30
NO_SNAPSHOTS = report.NO_SNAPSHOTS  # the throughput row without snapshots
# asynchronous against asynchronous, and torch.save, whose stall is what a synchronous save costs
DEFAULT_THROUGHPUT = ("torch_save", "dtrain", "dcp_async_save", "torchsnapshot_async_take")
AUTO_EVERY = 0  # --every auto, decided in the launch from dtrain's measured write time
RECOVERY_EVERY = 10  # steps between snapshots in the recovery run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-gb", type=float, default=1.0,
                   help="bytes of parameters + Adam state per rank, in GiB (default 1.0)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each save and restore, median reported (default 3)")
    p.add_argument("--ranks", default="1,2", help="world sizes to measure, comma separated (default 1,2)")
    p.add_argument("--only", default="", help=f"methods, comma separated, of: {', '.join(METHODS)}, "
                                              f"{NO_SNAPSHOTS} (default all)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="where the JSON goes")
    p.add_argument("--every", default="auto",
                   help="steps between snapshots in the throughput run, or auto: the interval in which "
                        "dtrain's write takes --write-share of the time (default auto)")
    p.add_argument("--write-share", type=float, default=0.10,
                   help="for --every auto: a snapshot's write time over the interval (default 0.10)")
    p.add_argument("--intervals", type=int, default=1,
                   help="snapshot intervals per timed throughput window; 0 skips throughput (default 1)")
    p.add_argument("--windows", type=int, default=5,
                   help="timed throughput windows per method and scenario, interleaved round by round; the "
                        "median and [min, max] are reported (default 5)")
    p.add_argument("--throughput", default=",".join(DEFAULT_THROUGHPUT),
                   help=f"methods timed in training beside no snapshots (default {','.join(DEFAULT_THROUGHPUT)})")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="training scenarios: all (torch threads on every core, or --threads) and spare (one "
                        "core left free for the writer) (default all,spare)")
    p.add_argument("--recovery-kills", type=int, default=3,
                   help="SIGKILLs of a worker under torchrun, timed to the next step; 0 skips (default 3)")
    p.add_argument("--recovery-gb", type=float, default=0.25,
                   help="parameters + Adam state of the recovery run's model, GiB (default 0.25)")
    p.add_argument("--tmp-dir", type=Path, default=REPO / "tmp",
                   help="where run dirs go; keep it on the filesystem under test (default <repo>/tmp)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank, and in the all-cores training scenario (default: cores / ranks, "
                        "at least 1)")
    p.add_argument("--case-timeout", type=float, default=900,
                   help="seconds without progress before a launch is killed as hung (default 900)")
    p.add_argument("--s3-mb", type=float, default=256,
                   help="state of the S3 case (bench.s3: a local SeaweedFS), in MiB; 0 skips it (default 256)")
    p.add_argument("--note", default="", help="free text kept in the JSON, e.g. what else ran on the machine")
    args = p.parse_args(argv)
    _validate(p, args)
    return args


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        p.error(f"--ranks {args.ranks!r}: expected comma-separated integers such as 1,2")
    if not args.ranks or min(args.ranks) < 1:
        p.error(f"--ranks {args.ranks}: world sizes must be 1 or more")
    args.only = [m.strip() for m in args.only.split(",") if m.strip()] or [*METHODS, NO_SNAPSHOTS]
    unknown = [m for m in args.only if m not in METHODS and m != NO_SNAPSHOTS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: unknown; choose from {', '.join(METHODS)}, {NO_SNAPSHOTS}")
    if args.state_gb <= 0 or args.reps < 1 or args.windows < 1 or args.intervals < 0 or args.threads < 0:
        p.error("--state-gb must be > 0, --reps >= 1, --windows >= 1, --intervals >= 0, --threads >= 0")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        p.error(f"--scenarios {','.join(args.scenarios)}: choose one or more of {','.join(SCENARIOS)}")
    args.every = _every(p, args.every)
    if not 0 < args.write_share < 1:
        p.error(f"--write-share {args.write_share}: a fraction between 0 and 1, such as 0.10")
    if args.every == AUTO_EVERY and args.intervals and "dtrain" not in args.only:
        p.error("--every auto sizes the interval from dtrain's save: add dtrain to --only, or give --every N")
    args.throughput = [m.strip() for m in args.throughput.split(",") if m.strip()]
    unknown = [m for m in args.throughput if m not in METHODS or not METHODS[m].in_throughput]
    if unknown:
        timed = [m for m in METHODS if METHODS[m].in_throughput]
        p.error(f"--throughput {','.join(unknown)}: choose from {', '.join(timed)}")


def _every(p: argparse.ArgumentParser, text: str) -> int:
    if text == "auto":
        return AUTO_EVERY
    if not text.isdigit() or int(text) < 1:
        p.error(f"--every {text!r}: a number of steps (1 or more) or auto")
    return int(text)


def cases_for(args: argparse.Namespace, world_size: int) -> list[str]:
    """Save cases first, then dtrain's restore at another world size (from 2 ranks up), then one
    throughput case: training changes the state that the save cases verify against."""
    saves = [f"save:{m}" for m in args.only if m in METHODS]
    reshard = ["reshard:dtrain"] if "dtrain" in args.only and world_size > 1 else []
    return saves + reshard + (["train"] if train_methods(args) else [])


def train_methods(args: argparse.Namespace) -> list[str]:
    """The variants of the throughput case, `none` first; empty when there is nothing to run."""
    with_snapshots = [m for m in args.only if m in args.throughput]
    if not args.intervals or not (with_snapshots or NO_SNAPSHOTS in args.only):
        return []
    return [NO_SNAPSHOTS, *with_snapshots]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[bench] %(message)s")
    logger.setLevel(logging.INFO)
    is_new_tmp_dir = not args.tmp_dir.exists()
    args.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.tmp_dir))
    if os.stat(work).st_dev != os.stat(REPO).st_dev:
        logger.warning("%s is not on the repository's filesystem", work)
    settings = Settings(state_bytes=int(args.state_gb * GIB), reps=args.reps, windows=args.windows,
                        intervals=args.intervals, every=args.every, write_share=args.write_share,
                        train_methods=train_methods(args), scenarios=args.scenarios, threads=args.threads,
                        cache_mode="drop_caches" if can_drop_caches() else "fadvise",
                        case_timeout_s=args.case_timeout, collective_timeout_s=max(600.0, args.case_timeout))
    results = {"machine": report.machine(work)}
    started = time.time()
    try:
        launches = {n: run_cases(cases_for(args, n), n, settings, work / f"ranks-{n}") for n in args.ranks}
        if args.recovery_kills:
            results["recovery"] = recovery.measure(args.recovery_gb, args.recovery_kills, RECOVERY_EVERY,
                                                   work / "recovery", say=logger.info)
        if args.s3_mb:
            results["s3"] = s3_case(args.s3_mb, args.reps, work / "s3.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if is_new_tmp_dir and not any(args.tmp_dir.iterdir()):
            args.tmp_dir.rmdir()
    results.update(summarize(args, settings, launches, time.time() - started))
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    write_json(args.out, results)
    print(render(results))
    print(f"\nwrote {args.out}")
    return 0


def s3_case(state_mb: float, reps: int, out: Path) -> dict[str, Any]:
    """`bench.s3` in a process of its own (it starts SeaweedFS): dtrain's save and restore in a bucket
    against boto3's own transfers of the same bytes; its table goes to stdout."""
    subprocess.run([sys.executable, "-m", "bench.s3", "--state-mb", str(state_mb), "--reps", str(reps),
                    "--out", str(out)], cwd=REPO, check=True)
    return json.loads(out.read_text())


def summarize(args: argparse.Namespace, settings: Settings, launches: dict[int, dict[str, Any]],
              seconds: float) -> dict[str, Any]:
    import torch

    saves, trains, reshards = [], [], []
    for n, launch in launches.items():
        for case, outcome in launch["cases"].items():
            kind, _, name = case.partition(":")
            if kind == "save":
                saves.append(report.save_row(name, n, outcome))
            elif kind == "reshard":
                reshards += report.reshard_rows(n, outcome)
            else:
                trains += report.train_rows(settings.train_methods, settings.scenarios, n, outcome)
    state_mb = {n: launch["state"]["nbytes"] / report.MB for n, launch in launches.items() if launch["state"]}
    report.add_ratios(saves, trains, state_mb)
    report.add_reshard_ratios(reshards, saves)
    ratios = report.dtrain_ratios(saves, trains, reshards, args.ranks, state_mb)
    headline = ratios[str(args.ranks[0])]
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "note": args.note,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds)),
        "duration_s": round(seconds, 1),
        "versions": versions(torch.__version__),
        "config": {"state_gb": args.state_gb, "state_bytes_requested": settings.state_bytes,
                   "state": {str(n): launch["state"] for n, launch in launches.items()},
                   "reps": args.reps, "ranks": args.ranks, "windows": args.windows, "intervals": args.intervals,
                   "every": "auto" if args.every == AUTO_EVERY else args.every, "write_share": args.write_share,
                   "page_cache": cache_text(settings.cache_mode),
                   "threads_per_rank": {str(n): threads_per_rank(settings, n) for n in args.ranks},
                   "scenarios": args.scenarios,
                   "scenario_threads_per_rank": {str(n): scenario_threads(settings, n) for n in args.ranks}},
        # dtrain against the baselines in training and restore, at the smallest world size of the run
        **{key: headline[key] for key in report.TRAINING_RATIO_DEFINITIONS},
        "headline_ranks": args.ranks[0],
        "ratios": ratios,
        "ratio_definitions": {**report.RATIO_DEFINITIONS, **report.TRAINING_RATIO_DEFINITIONS},
        "methods": saves,
        "restore_at_another_world_size": reshards,
        "throughput": trains,
    }


def versions(torch_version: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "torch": torch_version}
    for name in ("torchsnapshot", "numpy", "dtrain"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cache_text(mode: str) -> str:
    if mode == "drop_caches":
        return "dropped before every restore (files fsynced, then echo 1 > /proc/sys/vm/drop_caches)"
    return "evicted before every restore with posix_fadvise(DONTNEED) per file (drop_caches not writable)"


def render(results: dict[str, Any]) -> str:
    cfg, m = results["config"], results["machine"]
    sizes = ", ".join(f"{n} rank(s): {s['nbytes'] / GIB:.3f} GiB" for n, s in cfg["state"].items() if s)
    lines = [f"state per rank: {sizes}; {cfg['reps']} reps, medians; page cache {cfg['page_cache']}",
             f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"{m['filesystem']['type']} on {m['filesystem']['device']}; torch {results['versions']['torch']}",
             "", report.save_table(results["methods"])]
    if results["restore_at_another_world_size"]:
        lines += ["", report.reshard_table(results["restore_at_another_world_size"])]
    if results["throughput"]:
        lines += ["", report.train_tables(results["throughput"], cfg["windows"])]
    if "recovery" in results:
        r = results["recovery"]
        lines += ["", f"recovery under torchrun ({r['state_gb']:g} GiB state, snapshot every {r['every']} steps, "
                      f"{len(r['kills'])} SIGKILLs of a worker): training back {r['recovery_s_median']:.1f} s after "
                      f"the kill (resumed at {r['resumed_s_median']:.1f} s), {r['replayed_median']:g} steps replayed "
                      "(medians)"]
    lines += ["", "dtrain ratios: " + json.dumps(results["ratios"]),
              f"dtrain against the others at {results['headline_ranks']} rank(s): "
              + json.dumps({key: results[key] for key in report.TRAINING_RATIO_DEFINITIONS})]
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
