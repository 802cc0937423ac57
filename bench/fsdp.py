"""Snapshots of an FSDP2-sharded state: dtrain beside DCP `save`, `async_save` and `load`.

Usage:

    .venv/bin/python -m bench.fsdp                                          # 1 GiB over 2 ranks, 3 reps
    .venv/bin/python -m bench.fsdp --state-gb 0.1 --reps 2                  # quick run
    .venv/bin/python -m bench.fsdp --only dcp_save,dcp_async_save --restore-ranks 1,3

Each rank builds bench.state's MLP (its last layer one row wider, so that rows split unevenly),
wraps every Linear and then the whole model with `fully_shard`, and takes one Adam step: the
parameters and Adam's `exp_avg`/`exp_avg_sq` are DTensors sharded on dim 0, `--state-gb` in all
and 1/W of it per rank. Per method, `--reps` repetitions at `--ranks` ranks of:

    stall    seconds until save returns and training may change the parameters
    total    seconds until the snapshot is complete on every rank and fsynced
    written  bytes under the snapshot's dir: about 1x the state when each rank writes its shards
             once, W x when the state is written as if replicated
    restore  seconds to load it back into the live sharded model and optimizer, page cache dropped

then the last repetition's snapshot is restored `--reps` times by each of `--restore-ranks` ranks
(a launch of its own: the same model sharded over that many ranks, built with other values).
Every restore is checked against a fingerprint of the saved state that does not depend on its
sharding. A repetition's figure is the slowest rank's, a row's the median over repetitions. One
launch per method and world size, so a method that fails costs its own rows only. The table goes
to stdout; the figures, the ratios against issue 13's targets (stall <= 0.1x dcp.save, restore
<= dcp.load), the machine, the versions and the command to `--out` (bench/fsdp_results.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import fsdp_worker, report  # noqa: E402
from bench.launch import failure_note, free_port, read_events, threads_per_rank, watch  # noqa: E402
from bench.measure import MB, can_drop_caches  # noqa: E402
from bench.methods import METHODS  # noqa: E402
from bench.run import cache_text, versions, write_json  # noqa: E402

logger = logging.getLogger("bench")

GIB = 1 << 30
FSDP_METHODS = ("dcp_save", "dcp_async_save", "dtrain")
_REP_FIELDS = ("stall_s", "total_s", "fsync_s", "extra_rss_mb", "restore_s", "restore_extra_rss_mb")
TARGETS = {"fsdp_stall_ratio_vs_dcp_save": 0.1, "fsdp_restore_ratio_vs_dcp_load": 1.0}
RATIO_DEFINITIONS = {
    "fsdp_stall_ratio_vs_dcp_save": "dtrain's stall_s / dcp.save's stall_s, same FSDP state and ranks (target <= 0.1)",
    "fsdp_restore_ratio_vs_dcp_load": "dtrain's restore_s / dcp.load's restore_s (+ set_state_dict) of dcp.save's "
                                      "snapshot, at the saving world size (target <= 1)",
    "fsdp_restore_ratio_vs_dcp_load_at_N": "the same, restored by N ranks from the snapshot saved at --ranks",
    "fsdp_bytes_ratio_vs_state": "bytes under dtrain's snapshot dir / bytes of the whole state (1 = each shard once)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fsdp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-gb", type=float, default=1.0,
                   help="parameters + Adam state of the whole model, in GiB, split over the ranks (default 1.0)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per method and world size (default 3)")
    p.add_argument("--ranks", type=int, default=2, help="world size that saves (default 2)")
    p.add_argument("--restore-ranks", default="1,3",
                   help="other world sizes that restore the saved snapshot, comma separated; empty: none (default 1,3)")
    p.add_argument("--only", default=",".join(FSDP_METHODS),
                   help=f"methods, comma separated, of: {', '.join(FSDP_METHODS)} (default all)")
    p.add_argument("--tmp-dir", type=Path, default=REPO / "tmp",
                   help="where run dirs go; keep it on the filesystem under test (default <repo>/tmp)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "fsdp_results.json", help="where the JSON goes")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / ranks, at least 1)")
    p.add_argument("--case-timeout", type=float, default=900,
                   help="seconds without progress before a launch is killed as hung (default 900)")
    p.add_argument("--note", default="", help="free text kept in the JSON, e.g. what else ran on the machine")
    args = p.parse_args(argv)
    _validate(p, args)
    return args


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        restore_ranks = {int(r) for r in args.restore_ranks.split(",") if r.strip()}
    except ValueError:
        p.error(f"--restore-ranks {args.restore_ranks!r}: expected comma-separated integers such as 1,3")
    if args.ranks < 1 or any(r < 1 for r in restore_ranks):
        p.error(f"--ranks {args.ranks}, --restore-ranks {args.restore_ranks}: world sizes must be 1 or more")
    args.restore_ranks = sorted(restore_ranks - {args.ranks})  # the saving world size restores in its own launch
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in args.only if m not in FSDP_METHODS]
    if unknown or not args.only:
        p.error(f"--only {','.join(unknown)}: choose from {', '.join(FSDP_METHODS)}")
    if args.state_gb <= 0 or args.reps < 1 or args.threads < 0:
        p.error("--state-gb must be > 0, --reps >= 1, --threads >= 0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[bench fsdp] %(message)s")
    logger.setLevel(logging.INFO)
    is_new_tmp_dir = not args.tmp_dir.exists()
    args.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-fsdp-", dir=args.tmp_dir))
    cache_mode = "drop_caches" if can_drop_caches() else "fadvise"
    results: dict[str, Any] = {"machine": report.machine(work)}
    started = time.time()
    try:
        rows = [measure_method(name, args, cache_mode, work / name) for name in args.only]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if is_new_tmp_dir and not any(args.tmp_dir.iterdir()):
            args.tmp_dir.rmdir()
    results.update(summarize(args, rows, cache_mode, time.time() - started))
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    write_json(args.out, results)
    print(render(results))
    print(f"\nwrote {args.out}")
    return 0


# -- launches -----------------------------------------------------------------------------------


def measure_method(name: str, args: argparse.Namespace, cache_mode: str, work: Path) -> dict[str, Any]:
    """One method's row: its save launch at `--ranks`, then a restore launch per `--restore-ranks`."""
    logger.info("%s: %d reps at %d ranks", name, args.reps, args.ranks)
    spec = {"method": name, "reps": args.reps, "state_bytes": int(args.state_gb * GIB), "cache_mode": cache_mode,
            "collective_timeout_s": max(600.0, args.case_timeout), "run_root": str(work / "snapshot")}
    saved = run_launch({**spec, "mode": "save"}, args.ranks, args, work / f"save-{args.ranks}")
    expected, kept = saved.pop("fingerprint", None), saved.pop("kept", None)
    row = {"method": name, "label": METHODS[name].label, "restore_with": METHODS[name].restore_label,
           "ranks": args.ranks, **saved, "restore_at": {}}
    if saved["status"] != "ok":
        return row
    for n in args.restore_ranks:
        logger.info("%s: %d restores at %d ranks", name, args.reps, n)
        restored = run_launch({**spec, "mode": "restore", "run_dir": kept, "expected": expected}, n, args,
                              work / f"restore-{n}")
        restored.pop("fingerprint", None)  # that of the state as built there, before the restore
        row["restore_at"][str(n)] = restored
    return row


def run_launch(spec: dict[str, Any], world_size: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start `world_size` ranks of `fsdp_worker` on `spec`, wait for them, merge what they wrote."""
    log_dir.mkdir(parents=True)
    spec = {**spec, "world_size": world_size, "port": free_port(), "threads": threads_per_rank(args, world_size),
            "log_dir": str(log_dir)}
    ctx = mp.start_processes(fsdp_worker.main, args=(spec,), nprocs=world_size, join=False, start_method="spawn")
    failure = watch(ctx, log_dir, args.case_timeout)
    events = [read_events(log_dir / f"rank-{r}.jsonl") for r in range(world_size)]
    if failure is not None:
        note = failure_note(failure, events)
        logger.warning("%s (%s) at %d ranks failed: %s", spec["method"], spec["mode"], world_size, note)
        return {"status": "failed", "note": note}
    return merge_ranks(events)


def merge_ranks(events: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per repetition the slowest rank's seconds and the largest rank's memory; then the medians."""
    state = next(e for e in events[0] if e["event"] == "state")
    per_rank = [next(e for e in rank_events if e["event"] == "result") for rank_events in events]
    reps = [_merge_rep([r["reps"][i] for r in per_rank]) for i in range(len(per_rank[0]["reps"]))]
    fields = [f for f in (*_REP_FIELDS, "bytes_written") if f in reps[0]]
    out = {"status": "ok", "state": {k: state[k] for k in ("nbytes", "width", "build_s")},
           "fingerprint": state["fingerprint"],
           "local_nbytes": [next(e for e in r if e["event"] == "state")["local_nbytes"] for r in events],
           "verified": all(rep["verified"] for rep in reps), "reps": {f: [rep[f] for rep in reps] for f in fields},
           "warnings": sorted({w for r in per_rank for w in r["warnings"]})}
    out.update({f: statistics.median(out["reps"][f]) for f in fields})
    if "kept" in per_rank[0]:
        out["kept"] = per_rank[0]["kept"]
    return out


def _merge_rep(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {f: max(r[f] for r in ranks) for f in _REP_FIELDS if f in ranks[0]}
    out["verified"] = all(r["verified"] for r in ranks)
    written = [r["bytes_written"] for r in ranks if r.get("bytes_written") is not None]
    if written:
        out["bytes_written"] = written[0]  # rank 0 measures the whole dir
    return out


# -- summary ------------------------------------------------------------------------------------


def summarize(args: argparse.Namespace, rows: list[dict[str, Any]], cache_mode: str,
              seconds: float) -> dict[str, Any]:
    import torch

    state = next((r["state"] for r in rows if r["status"] == "ok"), {})
    for r in rows:
        if r["status"] == "ok":
            r["bytes_ratio_vs_state"] = r["bytes_written"] / r["state"]["nbytes"]
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "note": args.note,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds)),
        "duration_s": round(seconds, 1),
        "versions": versions(torch.__version__),
        "config": {"state_gb": args.state_gb, "state_bytes": state.get("nbytes"), "width": state.get("width"),
                   "reps": args.reps, "ranks": args.ranks, "restore_ranks": args.restore_ranks,
                   "threads_per_rank": {str(n): threads_per_rank(args, n) for n in [args.ranks, *args.restore_ranks]},
                   "page_cache": cache_text(cache_mode)},
        "ratios": ratios(rows, args.restore_ranks),
        "targets": TARGETS,
        "ratio_definitions": RATIO_DEFINITIONS,
        "methods": rows,
    }


def ratios(rows: list[dict[str, Any]], restore_ranks: list[int]) -> dict[str, float | None]:
    """dtrain against DCP, as issue 13 states its targets; None where either side is missing."""
    by_name = {r["method"]: r for r in rows if r["status"] == "ok"}
    ours, save = by_name.get("dtrain", {}), by_name.get("dcp_save", {})
    load = save or by_name.get("dcp_async_save", {})  # both restore with dcp.load
    out = {"fsdp_stall_ratio_vs_dcp_save": _div(ours.get("stall_s"), save.get("stall_s")),
           "fsdp_restore_ratio_vs_dcp_load": _div(ours.get("restore_s"), load.get("restore_s"))}
    for n in restore_ranks:
        out[f"fsdp_restore_ratio_vs_dcp_load_at_{n}"] = _div(_restore_at(ours, n), _restore_at(load, n))
    out["fsdp_bytes_ratio_vs_state"] = ours.get("bytes_ratio_vs_state")
    return out


def _restore_at(row: dict[str, Any], n: int) -> float | None:
    at = row.get("restore_at", {}).get(str(n), {})
    return at.get("restore_s") if at.get("status") == "ok" else None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def render(results: dict[str, Any]) -> str:
    cfg, m, rows = results["config"], results["machine"], results["methods"]
    others = cfg["restore_ranks"]
    header = ("FSDP2 state", "stall s", "total s", "written MB", "x state", f"restore s ({cfg['ranks']})",
              *(f"restore s ({n})" for n in others), "note")
    body = [(r["label"], report.fmt(r.get("stall_s")), report.fmt(r.get("total_s")),
             report.fmt(r["bytes_written"] / MB if "bytes_written" in r else None, 1),
             report.fmt(r.get("bytes_ratio_vs_state"), 2), report.fmt(r.get("restore_s")),
             *(report.fmt(_restore_at(r, n)) for n in others), _note(r, others)) for r in rows]
    size = f"{cfg['state_bytes'] / GIB:.3f} GiB (width {cfg['width']})" if cfg["state_bytes"] else "not built"
    lines = [f"FSDP2 state {size} over {cfg['ranks']} ranks; {cfg['reps']} reps, medians, slowest rank; "
             f"page cache {cfg['page_cache']}",
             f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"{m['filesystem']['type']} on {m['filesystem']['device']}; torch {results['versions']['torch']}",
             "", report.table(header, body), ""]
    for key, value in results["ratios"].items():
        target = results["targets"].get(key)
        verdict = "" if target is None or value is None else (" (meets target)" if value <= target else " (MISSES target)")
        lines.append(f"{key}: {report.fmt(value)}" + (f", target <= {target:g}{verdict}" if target else ""))
    return "\n".join(lines)


def _note(row: dict[str, Any], others: list[int]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['note']}"
    notes = [f"restore: {row['restore_with']}"]
    if not row["verified"]:
        notes.append("RESTORED STATE DIFFERS FROM THE SAVED ONE")
    for n in others:
        at = row["restore_at"].get(str(n), {})
        if at.get("status") != "ok":
            notes.append(f"at {n} ranks {at.get('status')}: {at.get('note', '')}")
        elif not at["verified"]:
            notes.append(f"at {n} ranks RESTORED STATE DIFFERS")
    return "; ".join(notes)


if __name__ == "__main__":
    sys.exit(main())
