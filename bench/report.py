"""From per-rank repetitions to rows, ratios and the printed tables.

A repetition's figure is the slowest rank's (the next DDP step waits for it) and, for memory, the
largest rank's; a row's figure is the median over repetitions.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.methods import METHODS

MB = 1 << 20
_SAVE_FIELDS = ("stall_s", "total_s", "fsync_s", "extra_rss_mb", "restore_s", "restore_extra_rss_mb")

RATIO_DEFINITIONS = {
    "stall_ratio_vs_torch_save": "stall_s / stall_s of torch_save (torch.save + fsync on rank 0)",
    "commit_ratio_vs_raw_write": "total_s / total_s of raw_io (sequential write + fsync of the same bytes)",
    "throughput_ratio_with_snapshots": "steps/s with a snapshot every N steps / steps/s with none",
    "restore_ratio_vs_raw_read": "restore_s / restore_s of raw_io (sequential read of the same bytes)",
    "extra_rss_ratio": "peak extra memory (the process's RSS plus its children's private pages) / the state's "
                       "size on one rank (1.0 = one full extra copy); the worse of the save case and training",
    "restore_resharded_ratio_vs_raw_read": "restore_s of a snapshot saved at another world size / restore_s "
                                           "of raw_io at the restoring world size (the worse of both ways)",
}


def save_row(name: str, ranks: int, outcome: dict[str, Any]) -> dict[str, Any]:
    method = METHODS[name]
    row: dict[str, Any] = {"method": name, "label": method.label, "ranks": ranks,
                           "restore_with": method.restore_label, "is_durable": method.is_durable}
    if "per_rank" not in outcome:
        return {**row, **outcome}
    per_rank = outcome["per_rank"]
    row["warnings"] = sorted({w for r in per_rank for w in r.get("warnings", []) if w})
    skipped = [r for r in per_rank if r["status"] != "ok"]
    if skipped:
        return {**row, "status": skipped[0]["status"], "note": skipped[0].get("note", "")}
    reps = [_merge_rep([r["reps"][i] for r in per_rank]) for i in range(len(per_rank[0]["reps"]))]
    row.update({"status": "ok", "note": _restore_note(per_rank)})
    row.update({f: _median([rep[f] for rep in reps]) for f in _SAVE_FIELDS})
    verified = [rep["verified"] for rep in reps if rep.get("verified") is not None]
    row["verified"] = all(verified) if verified else None
    row["baseline_rss_mb"] = [r["baseline_rss_mb"] for r in per_rank]
    row["reps"] = {f: [rep[f] for rep in reps] for f in _SAVE_FIELDS}
    return row


def _merge_rep(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _SAVE_FIELDS:
        values = [r.get(f) for r in ranks]
        out[f] = None if any(v is None for v in values) else max(values)
    verified = [r.get("verified") for r in ranks]
    out["verified"] = None if any(v is None for v in verified) else all(verified)
    return out


def _restore_note(per_rank: list[dict[str, Any]]) -> str:
    notes = {rep.get("restore_note") for r in per_rank for rep in r["reps"]} - {None}
    return "; ".join(sorted(notes))


def train_rows(names: list[str], ranks: int, outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant of the throughput case; a failed case fails every variant."""
    return [_train_row(name, ranks, outcome) for name in names]


def _train_row(name: str, ranks: int, outcome: dict[str, Any]) -> dict[str, Any]:
    first = outcome.get("per_rank", [{}])[0]
    every, steps = first.get("every"), first.get("steps")
    label = "no snapshots" if name == "none" else f"{METHODS[name].label} every {every} steps"
    row: dict[str, Any] = {"method": name, "label": label, "ranks": ranks, "every": every, "steps": steps,
                           "write_s": first.get("write_s"), "step_s": first.get("step_s")}
    if "per_rank" not in outcome:
        return {**row, **outcome}
    per_rank = [r["variants"][name] if r["status"] == "ok" else r for r in outcome["per_rank"]]
    skipped = [r for r in per_rank if r["status"] != "ok"]
    if skipped:
        return {**row, "status": skipped[0]["status"], "note": skipped[0].get("note", "")}
    reps = [min(r["steps_per_s"][i] for r in per_rank) for i in range(len(per_rank[0]["steps_per_s"]))]
    peaks = [max(r["peak_mem_mb"][i] for r in per_rank) for i in range(len(per_rank[0]["peak_mem_mb"]))]
    return {**row, "status": "ok", "steps_per_s": _median(reps), "reps": reps,
            "peak_mem_mb": _median(peaks), "peak_mem_mb_reps": peaks,
            "snapshots_per_rep": per_rank[0]["snapshots_per_rep"],
            "warnings": sorted({w for r in outcome["per_rank"] for w in r.get("warnings", []) if w})}


def add_ratios(saves: list[dict[str, Any]], trains: list[dict[str, Any]], state_mb: dict[int, float]) -> None:
    """Each row gets the five ratios against the baselines of its world size (None where either
    side is missing)."""
    for row in saves:
        base = {r["method"]: r for r in saves if r["ranks"] == row["ranks"] and r.get("status") == "ok"}
        ok = row.get("status") == "ok"
        row["ratios"] = {
            "stall_ratio_vs_torch_save": _ratio(row, base.get("torch_save"), "stall_s", ok),
            "commit_ratio_vs_raw_write": _ratio(row, base.get("raw_io"), "total_s", ok),
            "restore_ratio_vs_raw_read": _ratio(row, base.get("raw_io"), "restore_s", ok),
            "extra_rss_ratio": _div(row.get("extra_rss_mb") if ok else None, state_mb.get(row["ranks"])),
        }
    for row in trains:
        none = [r for r in trains if r["ranks"] == row["ranks"] and r["method"] == "none"]
        row["ratio_vs_none"] = _ratio(row, none[0] if none else None, "steps_per_s", row.get("status") == "ok")
        both = none and none[0].get("peak_mem_mb") is not None and row.get("peak_mem_mb") is not None
        row["extra_mem_mb"] = row["peak_mem_mb"] - none[0]["peak_mem_mb"] if both else None


def dtrain_ratios(saves: list[dict[str, Any]], trains: list[dict[str, Any]], reshards: list[dict[str, Any]],
                  ranks: list[int], state_mb: dict[int, float]) -> dict[str, Any]:
    """The headline ratios of dtrain per world size (the launch's); null where a case is missing."""
    out: dict[str, Any] = {}
    for n in ranks:
        save = next((r for r in saves if r["method"] == "dtrain" and r["ranks"] == n), {})
        train = next((r for r in trains if r["method"] == "dtrain" and r["ranks"] == n), {})
        ratios = dict.fromkeys(RATIO_DEFINITIONS)
        ratios.update(save.get("ratios", {}))
        ratios["throughput_ratio_with_snapshots"] = train.get("ratio_vs_none")
        in_training = _div(train.get("extra_mem_mb"), state_mb.get(n))
        if in_training is not None and ratios["extra_rss_ratio"] is not None:  # the worse of save case and training
            ratios["extra_rss_ratio"] = max(ratios["extra_rss_ratio"], in_training)
        both_ways = [r.get("ratio_vs_raw_read") for r in reshards if r["launch_ranks"] == n]
        if both_ways and None not in both_ways:
            ratios["restore_resharded_ratio_vs_raw_read"] = max(both_ways)
        out[str(n)] = ratios
    return out


def reshard_rows(launch_ranks: int, outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """Two rows, W -> 1 and 1 -> W: the median over repetitions of the slowest restoring rank."""
    rows = []
    for way, saved, restored in (("to_one", launch_ranks, 1), ("from_one", 1, launch_ranks)):
        row: dict[str, Any] = {"label": f"dtrain: saved on {saved}, restored on {restored}",
                               "saved_ranks": saved, "ranks": restored, "launch_ranks": launch_ranks}
        per_rank = outcome.get("per_rank")
        if per_rank is None or any(r["status"] != "ok" for r in per_rank):
            bad = outcome if per_rank is None else next(r for r in per_rank if r["status"] != "ok")
            rows.append({**row, "status": bad.get("status"), "note": bad.get("note", "")})
            continue
        reps = [[r[way][i] for r in per_rank if r[way][i]["restore_s"] is not None]
                for i in range(len(per_rank[0][way]))]
        seconds = [max(x["restore_s"] for x in rep) for rep in reps]
        rows.append({**row, "status": "ok", "restore_s": _median(seconds), "reps": seconds,
                     "verified": all(x["verified"] for rep in reps for x in rep)})
    return rows


def add_reshard_ratios(reshards: list[dict[str, Any]], saves: list[dict[str, Any]]) -> None:
    """Each row over the raw read floor at its restoring world size (None where not measured)."""
    for row in reshards:
        floor = next((r for r in saves if r["method"] == "raw_io" and r["ranks"] == row["ranks"]
                      and r.get("status") == "ok"), None)
        row["raw_read_s"] = floor.get("restore_s") if floor else None
        row["ratio_vs_raw_read"] = _div(row.get("restore_s"), row["raw_read_s"])


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, field: str, ok: bool) -> float | None:
    if not ok or base is None:
        return None
    return _div(row.get(field), base.get(field))


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# -- tables -------------------------------------------------------------------------------------


def save_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "ranks", "stall s", "total s", "extra mem MB", "restore s", "note")
    body = [(r["label"], str(r["ranks"]), _fmt(r.get("stall_s")), _fmt(r.get("total_s")),
             _fmt(r.get("extra_rss_mb"), 0), _fmt(r.get("restore_s")), _row_note(r)) for r in rows]
    return _table(header, body)


def reshard_table(rows: list[dict[str, Any]]) -> str:
    header = ("restore at another world size", "restore s", "raw read s", "ratio", "note")
    body = [(r["label"], _fmt(r.get("restore_s")), _fmt(r.get("raw_read_s")), _fmt(r.get("ratio_vs_raw_read")),
             f"{r.get('status')}: {r.get('note', '')}" if r.get("status") != "ok"
             else ("" if r.get("verified") else "RESTORED VALUES DIFFER"))
            for r in rows]
    return _table(header, body)


def train_table(rows: list[dict[str, Any]]) -> str:
    header = ("training", "ranks", "steps/s", "vs none", "snapshots", "extra mem MB", "note")
    body = [(r["label"], str(r["ranks"]), _fmt(r.get("steps_per_s")), _fmt(r.get("ratio_vs_none")),
             str(r.get("snapshots_per_rep", "")), _fmt(r.get("extra_mem_mb"), 0),
             r.get("note", "") if r.get("status") != "ok" else "")
            for r in rows]
    return _table(header, body)


def _row_note(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('note', '')}"
    notes = [f"restore: {r['restore_with']}"] if r.get("restore_s") is not None else []
    if r.get("verified") is False:
        notes.append("RESTORED VALUES CHANGED AFTER SAVE RETURNED")
    if not r.get("is_durable"):
        notes.append("total ends in memory")
    if r.get("note"):
        notes.append(r["note"])
    return "; ".join(notes)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, tuple("-" * w for w in widths) + ("-" * 4,), *body]:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())  # the last column is free text, left unpadded
    return "\n".join(lines)


# -- the machine --------------------------------------------------------------------------------


def machine(path: Path) -> dict[str, Any]:
    """CPU, cores, memory and the filesystem that holds `path`."""
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _mem_gib(),
            "kernel": platform.release(), "filesystem": _filesystem(path),
            "loadavg_at_start": list(os.getloadavg())}


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return 0.0


def _filesystem(path: Path) -> dict[str, Any]:
    best = ("", "", "")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, fstype = line.split()[:3]
            if _is_under(path.resolve(), mount) and len(mount) > len(best[1]):
                best = (device, mount, fstype)
    usage = shutil.disk_usage(path)
    return {"path": str(path), "device": best[0], "mount": best[1], "type": best[2],
            "size_gib": round(usage.total / (1 << 30), 1), "free_gib": round(usage.free / (1 << 30), 1)}


def _is_under(path: Path, mount: str) -> bool:
    return mount == "/" or str(path) == mount or str(path).startswith(mount + "/")
