"""The `dtrain` command line.

    torchrun --nproc_per_node 2 -m dtrain train --config examples/demo.toml --run-dir runs/demo
    dtrain train --check --config examples/demo.toml --run-dir runs/demo   # preflight: starts nothing
    dtrain ckpt list runs/demo [--json]
    dtrain ckpt show runs/demo/snapshots/step_000000200 [--json]
    dtrain ckpt verify runs/demo
    dtrain ckpt export runs/demo --out model.safetensors [--best]
    dtrain ckpt prune runs/demo
    dtrain report runs/demo [--out report.html]   # the loss curve, the fault timeline, attempts, goodput
    dtrain status runs/demo [--json]              # step, newest snapshot, save in flight, last event

Exit codes: 0 done, 1 failed, 2 bad config or usage, 75 preempted (emergency snapshot
committed; run the same command again to resume). With `--check`: 0 ready, 2 bad config or run dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dtrain import signals
from dtrain.errors import ConfigError, DTrainError, NoSnapshotError, Preempted
from dtrain.storage.location import RunLocation, parse_run_dir

if TYPE_CHECKING:
    from dtrain.config import Config
    from dtrain.task import Task

logger = logging.getLogger("dtrain")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dtrain: config error: {e}", file=sys.stderr)
        return signals.EXIT_CONFIG
    except Preempted as e:
        logger.warning("%s", e)
        return signals.EXIT_PREEMPTED
    except DTrainError as e:
        print(f"dtrain: error: {e}", file=sys.stderr)
        return signals.EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train, resuming from the run dir's newest committed snapshot")
    train.add_argument("--config", help="TOML config file (defaults apply without one)")
    train.add_argument("--run-dir", required=True,
                       help="what this run owns: a directory, or s3://BUCKET/PREFIX (snapshots in the bucket; "
                            "the lock and metrics in $DTRAIN_LOCAL_DIR/BUCKET/PREFIX, default ./dtrain-local/...)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value; repeatable")
    train.add_argument("--check", action="store_true",
                       help="only check the config, the task's entry points and the run dir (for the world size "
                            "in $WORLD_SIZE, else 1); start and write nothing; exit 0 if ready, else 2")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume although train.seed or a task.* key differs from the snapshot's (the data "
                            "order or the model changes: samples are repeated or skipped)")
    train.set_defaults(func=cmd_train)

    ckpt = commands.add_parser("ckpt", help="inspect and manage snapshots").add_subparsers(dest="ckpt", required=True)
    p = ckpt.add_parser("list", help="committed snapshots of a run dir, oldest first")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = ckpt.add_parser("show", help="a snapshot's manifest")
    p.add_argument("snapshot", help="a snapshot dir, or a run dir for its newest snapshot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = ckpt.add_parser("verify", help="check every file against its recorded size and checksum")
    p.add_argument("target", help="a snapshot dir, or a run dir to verify all its snapshots")
    p.set_defaults(func=cmd_verify)
    p = ckpt.add_parser("export", help="write the model weights as safetensors")
    p.add_argument("target", help="a snapshot dir, or a run dir (its newest snapshot)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--best", action="store_true", help="from a run dir: the best snapshot by the run's best_metric")
    p.set_defaults(func=cmd_export)
    p = ckpt.add_parser("prune", help="apply the run's retention policy now")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_prune)

    p = commands.add_parser("report", help="write a self-contained HTML report of a run: loss, faults, attempts")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output .html file (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    p = commands.add_parser("status", help="one line: step, newest snapshot, save in flight, last event")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dtrain.dist import init_distributed, shutdown
    from dtrain.progress import ProgressLog
    from dtrain.snapshot.layout import METRICS
    from dtrain.trainer import Trainer

    cfg, task = preflight(args)  # every check before the run dir is touched
    if args.check:
        print(f"dtrain: ready: config, task and run dir {args.run_dir} check out; nothing was started")
        return signals.EXIT_OK
    ctx = init_distributed(cfg)
    try:
        location = parse_run_dir(args.run_dir)
        run_dir = location.local_dir()
        progress = ProgressLog(run_dir / METRICS, cfg.train.steps, 0, enabled=ctx.is_main,
                               every=cfg.train.log_every_steps, tensorboard_log=cfg.report.tensorboard)
        Trainer(cfg, task, run_dir, ctx, progress=progress, allow_config_change=args.allow_config_change,
                storage=None if location.is_local else location.storage()).fit()
        return signals.EXIT_OK
    finally:
        shutdown()


def preflight(args: argparse.Namespace) -> tuple[Config, Task]:
    """(config, task) once everything that needs no process group checks out; raises ConfigError.

    Launchers run it alone (`dtrain train --check`) before torchrun: a bad config then exits 2
    once, instead of in every worker of every restart.
    """
    from dtrain.config import load_config, validate_for_world, validate_staging_for_device
    from dtrain.dist import env_world_size, planned_device_type
    from dtrain.runlock import probe
    from dtrain.task import load_task

    cfg = load_config(args.config, args.set)
    validate_for_world(cfg, env_world_size())
    validate_staging_for_device(cfg, planned_device_type(cfg))
    task = load_task(cfg.task)
    location = parse_run_dir(args.run_dir)
    if not location.is_local:
        check_bucket(location)
    run_dir = location.local_dir()
    check_run_dir(run_dir)
    if run_dir.is_dir():
        probe(run_dir)
    return cfg, task


def check_bucket(location: RunLocation) -> None:
    """Refuse an `s3://` run dir whose bucket cannot be reached (no such bucket, no access, no endpoint)."""
    try:
        location.storage().check_bucket()
    except OSError as e:
        raise ConfigError(f"--run-dir {location.url}: {e}") from None


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run dir this process could not create or write; writes nothing.

    An existing run dir must be a writable directory, and so must what dtrain writes in it; a new
    one needs its nearest existing parent to be a writable directory.
    """
    from dtrain.snapshot.layout import METRICS, PENDING, SNAPSHOTS

    fix = "pass a --run-dir this user can write (on storage every node sees), or fix its owner or permissions"
    try:
        existing = run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        for path, is_dir in [(existing, True), (run_dir / SNAPSHOTS, True), (run_dir / PENDING, True),
                             (run_dir / METRICS, False)]:
            if path == existing or path.exists() or path.is_symlink():
                _require_writable(run_dir, path, is_dir, fix)
    except OSError as e:  # an ancestor that cannot be searched
        raise ConfigError(f"--run-dir {run_dir}: {e.filename} cannot be reached ({e.strerror}); {fix}") from None


def _require_writable(run_dir: Path, path: Path, is_dir: bool, fix: str) -> None:
    if path != run_dir and path.is_relative_to(run_dir) and path.is_symlink():  # snapshots are read only through real directories
        raise ConfigError(f"--run-dir {run_dir}: {path} is a symlink; dtrain keeps snapshots in real directories "
                          "inside the run dir (point --run-dir itself at other storage instead)")
    if is_dir and not path.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: {path} is not a directory; {fix}")
    if not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
        raise ConfigError(f"--run-dir {run_dir}: {path} is not writable by uid {os.getuid()} "
                          f"(or is on a read-only file system); {fix}")


def cmd_list(args: argparse.Namespace) -> int:
    from dtrain.snapshot import catalog

    storage = catalog.open_run_dir(args.run_dir)
    rows = [{"step": m.step, "path": catalog.snapshot_path(storage, m.step), "world_size": m.world_size,
             "metrics": m.metrics, "bytes": m.total_bytes, "created_unix": m.created_unix}
            for m in catalog.readable_manifests(storage).values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'step':>10}  {'world':>5}  {'MB':>9}  metrics")
        for r in rows:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items() if isinstance(v, float))
            print(f"{r['step']:>10}  {r['world_size']:>5}  {r['bytes'] / 1e6:>9.2f}  {metrics}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dtrain.snapshot import catalog
    from dtrain.snapshot.shards import row_layout

    storage, step = catalog.resolve(args.snapshot)
    m = catalog.read_manifest(storage, catalog.newest_step(storage) if step is None else step)
    rows = row_layout(m)
    if args.json:
        print(json.dumps({**asdict(m), "sharded_rows": rows}, indent=2))
        return 0
    print(f"snapshot     {catalog.snapshot_path(storage, m.step)}")
    print(f"step         {m.step}")
    print(f"world size   {m.world_size}")
    print(f"strategy     {m.config.get('dist', {}).get('strategy') or ('fsdp' if rows else 'ddp')}")
    print(f"progress     {json.dumps(m.progress)}")
    print(f"metrics      {json.dumps(m.metrics)}")
    print(f"versions     {json.dumps(m.versions)}")
    print(f"files        {len(m.files)} ({m.total_bytes / 1e6:.2f} MB)")
    for name, f in sorted(m.files.items()):
        print(f"  {name:<24} {f.bytes:>12} bytes  crc32c {f.crc32c:08x}  written by rank {f.writer}")
    print(f"tensors      {len(m.tensors)} ({sum(1 for t in m.tensors.values() if t.view)} stored as views of shared bytes)")
    if rows:
        print(f"sharded      {len(rows)} tensors, by rows along dim 0 (rank: rows)")
        for key, spans in sorted(rows.items()):
            shape = "x".join(map(str, m.tensors[key].shape))
            print(f"  {key:<40} {shape:>14}  " + "  ".join(f"{r}: {lo}-{hi}" for r, lo, hi in spans))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dtrain.snapshot import catalog, reader

    storage, step = catalog.resolve(args.target)
    steps = catalog.committed_steps(storage) if step is None else [step]
    if not steps:
        raise NoSnapshotError(f"{args.target}: no committed snapshot to verify")
    bad = 0
    for step in steps:
        problems = reader.verify(storage, step)
        print(f"{'OK ' if not problems else 'BAD'} {catalog.snapshot_path(storage, step)}")
        for p in problems:
            print(f"    {p}")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from dtrain.export import export_safetensors
    from dtrain.snapshot import catalog

    storage, step = catalog.resolve(args.target)
    written = export_safetensors(storage, step, Path(args.out), best=args.best)
    print(f"exported step {written} to {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Retention by the run's own settings, never deleting the newest snapshot; refused while a job holds the run dir."""
    from dtrain.runlock import RunDirLock
    from dtrain.snapshot import catalog

    storage = catalog.open_run_dir(args.run_dir)
    location = parse_run_dir(args.run_dir)
    # A bucket has no lock (see README, Object storage); a local run dir's lock refuses a running job.
    with RunDirLock(location.local_dir()) if location.is_local else contextlib.nullcontext():
        deleted = catalog.prune(storage, catalog.run_snapshot_config(storage),
                                protected=frozenset({catalog.newest_step(storage)}))
    print(f"deleted {len(deleted)} snapshot(s): {deleted}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dtrain.observe.runreport import render
    from dtrain.observe.sources import read_run_dir

    run = read_run_dir(args.run_dir)
    out = Path(args.out) if args.out else run.path / "report.html"
    out.write_text(render(run))
    print(f"wrote {out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dtrain.observe.sources import read_run_dir
    from dtrain.observe.status import one_line, status

    found = status(read_run_dir(args.run_dir))
    print(json.dumps(found, indent=2) if args.json else one_line(found))
    return 0
