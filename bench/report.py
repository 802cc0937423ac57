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

from bench.launch import ALL_CORES, SPARE_CORE
from bench.methods import METHODS

MB = 1 << 20
NO_SNAPSHOTS = "none"
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

# dtrain against the other methods in training and against dcp.load; also at the top of results.json
TRAINING_RATIO_DEFINITIONS = {
    "cost_per_save_ratio_vs_torch_save": "dtrain's cost per save / torch.save+fsync's stall, both from the "
                                         "all-cores training table (a synchronous save's cost is its stall)",
    "spare_core_cost_per_save_ratio_vs_torch_save": "the same, from the spare-core training table",
    "throughput_ratio_vs_dcp_async_save": "dtrain's steps/s with snapshots / dcp.async_save's, all cores",
    "spare_core_throughput_ratio_vs_dcp_async_save": "the same, with a core left free",
    "spare_core_throughput_ratio_with_snapshots": "dtrain's steps/s with snapshots / steps/s with none, "
                                                  "with a core left free",
    "restore_ratio_vs_dcp_load": "dtrain's restore_s / dcp.load's (the median over every restore of "
                                 "dcp_save and dcp_async_save at the same world size)",
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


def train_rows(names: list[str], scenarios: list[str], ranks: int, outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scenario and variant of the throughput case; a failed case fails every row."""
    return [row for scenario in scenarios for row in _scenario_rows(names, scenario, ranks, outcome)]


def _scenario_rows(names: list[str], scenario: str, ranks: int, outcome: dict[str, Any]) -> list[dict[str, Any]]:
    per_rank = outcome.get("per_rank", [])
    plan = per_rank[0].get("scenarios", {}).get(scenario, {}) if per_rank else {}
    every, steps = plan.get("every"), plan.get("steps")
    base = {"scenario": scenario, "ranks": ranks, "threads_per_rank": plan.get("threads"), "every": every,
            "steps": steps, "write_s": plan.get("write_s"), "step_s": plan.get("step_s")}
    rows, windows = [], {}
    for name in names:
        label = "no snapshots" if name == NO_SNAPSHOTS else METHODS[name].label
        label += f" every {every} steps" if every and name != NO_SNAPSHOTS else ""
        row = {"method": name, "label": label, **base}
        problem = _train_problem(outcome, scenario, name)
        if problem is not None:
            rows.append({**row, **problem})
            continue
        windows[name] = _merge_windows([r["scenarios"][scenario]["variants"][name]["windows"] for r in per_rank])
        rows.append({**row, "status": "ok", **_window_figures(windows[name], steps),
                     "warnings": sorted({w for r in per_rank for w in r.get("warnings", []) if w})})
    _add_costs(rows, windows)
    return rows


def _train_problem(outcome: dict[str, Any], scenario: str, name: str) -> dict[str, Any] | None:
    """Why a row has no figures (the case, its scenario or the method failed or was skipped), or None."""
    if "per_rank" not in outcome:
        return {"status": outcome.get("status", "failed"), "note": outcome.get("note", "")}
    for r in outcome["per_rank"]:
        plan = r.get("scenarios", {}).get(scenario, {})
        for part in (r, plan, plan.get("variants", {}).get(name, {})):
            if part.get("status") != "ok":
                return {"status": part.get("status") or "missing", "note": part.get("note", "")}
    return None


def _merge_windows(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per window: the slowest rank's seconds and stall (the next DDP step waits for it), the largest
    rank's memory, and the CPU seconds and page faults of all ranks together (what the machine spent)."""
    out = []
    for ranks in zip(*per_rank, strict=True):
        stalls = [w["stall_s"] for w in ranks if w["stall_s"] is not None]
        out.append({"seconds": max(w["seconds"] for w in ranks), "saves": ranks[0]["saves"],
                    "stall_s": max(stalls) if stalls else None, "cpu_s": sum(w["cpu_s"] for w in ranks),
                    "minor_faults": sum(w["minor_faults"] for w in ranks),
                    "peak_mem_mb": max(w["peak_mem_mb"] for w in ranks)})
    return out


def _window_figures(windows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    rates = [steps / w["seconds"] for w in windows]
    peaks = [w["peak_mem_mb"] for w in windows]
    stalls = [w["stall_s"] for w in windows]
    return {"steps_per_s": _median(rates), "steps_per_s_spread": _spread(rates), "steps_per_s_windows": rates,
            "stall_s": _median(stalls), "stall_s_windows": stalls,
            "window_s": [w["seconds"] for w in windows], "cpu_s_windows": [w["cpu_s"] for w in windows],
            "peak_mem_mb": _median(peaks), "peak_mem_mb_windows": peaks,
            "snapshots_per_window": windows[0]["saves"] if windows else None}


_PER_SAVE = (("seconds", "cost_per_save_s"), ("cpu_s", "cpu_s_per_save"), ("minor_faults", "minor_faults_per_save"))


def _add_costs(rows: list[dict[str, Any]], windows: dict[str, list[dict[str, Any]]]) -> None:
    """What a save costs training, in seconds and in CPU seconds: each window with snapshots minus the
    same round's window without, over its saves; the median over rounds and their spread."""
    none = windows.get(NO_SNAPSHOTS)
    for row in rows:
        mine = windows.get(row["method"])
        for field, key in _PER_SAVE:
            per_save = None
            if row["method"] != NO_SNAPSHOTS and mine is not None and none is not None:
                per_save = [(w[field] - n[field]) / w["saves"] for w, n in zip(mine, none, strict=True) if w["saves"]]
            row[key] = _median(per_save or [])
            row[f"{key}_spread"] = _spread(per_save or [])
            row[f"{key}_windows"] = per_save


def _spread(values: list[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


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
        none = [r for r in trains
                if r["ranks"] == row["ranks"] and r["scenario"] == row["scenario"] and r["method"] == NO_SNAPSHOTS]
        row["ratio_vs_none"] = _ratio(row, none[0] if none else None, "steps_per_s", row.get("status") == "ok")
        both = none and none[0].get("peak_mem_mb") is not None and row.get("peak_mem_mb") is not None
        row["extra_mem_mb"] = row["peak_mem_mb"] - none[0]["peak_mem_mb"] if both else None


def dtrain_ratios(saves: list[dict[str, Any]], trains: list[dict[str, Any]], reshards: list[dict[str, Any]],
                  ranks: list[int], state_mb: dict[int, float]) -> dict[str, Any]:
    """The headline ratios of dtrain per world size (the launch's); null where a case is missing."""
    out: dict[str, Any] = {}
    for n in ranks:
        save = next((r for r in saves if r["method"] == "dtrain" and r["ranks"] == n), {})
        train = _train_row(trains, "dtrain", ALL_CORES, n)
        ratios = dict.fromkeys(RATIO_DEFINITIONS)
        ratios.update(save.get("ratios", {}))
        ratios["throughput_ratio_with_snapshots"] = train.get("ratio_vs_none")
        in_training = _div(train.get("extra_mem_mb"), state_mb.get(n))
        if in_training is not None and ratios["extra_rss_ratio"] is not None:  # the worse of save case and training
            ratios["extra_rss_ratio"] = max(ratios["extra_rss_ratio"], in_training)
        both_ways = [r.get("ratio_vs_raw_read") for r in reshards if r["launch_ranks"] == n]
        if both_ways and None not in both_ways:
            ratios["restore_resharded_ratio_vs_raw_read"] = max(both_ways)
        ratios.update(training_ratios(trains, n))
        ratios["restore_ratio_vs_dcp_load"] = _div(save.get("restore_s"), _dcp_load_s(saves, n))
        out[str(n)] = ratios
    return out


def training_ratios(trains: list[dict[str, Any]], n: int) -> dict[str, float | None]:
    """dtrain's cost per save and throughput against torch.save and dcp.async_save, per scenario."""
    out: dict[str, float | None] = {}
    for scenario, prefix in ((ALL_CORES, ""), (SPARE_CORE, "spare_core_")):
        dtrain = _train_row(trains, "dtrain", scenario, n)
        out[f"{prefix}cost_per_save_ratio_vs_torch_save"] = _div(
            dtrain.get("cost_per_save_s"), _train_row(trains, "torch_save", scenario, n).get("stall_s"))
        out[f"{prefix}throughput_ratio_vs_dcp_async_save"] = _div(
            dtrain.get("steps_per_s"), _train_row(trains, "dcp_async_save", scenario, n).get("steps_per_s"))
    out["spare_core_throughput_ratio_with_snapshots"] = _train_row(trains, "dtrain", SPARE_CORE, n).get("ratio_vs_none")
    return out


def _train_row(trains: list[dict[str, Any]], method: str, scenario: str, n: int) -> dict[str, Any]:
    return next((r for r in trains if r["method"] == method and r["scenario"] == scenario and r["ranks"] == n
                 and r.get("status") == "ok"), {})


def _dcp_load_s(saves: list[dict[str, Any]], n: int) -> float | None:
    """dcp.load's median restore at world size `n`, over every repetition of both DCP methods."""
    seconds = [s for r in saves if r["method"] in ("dcp_save", "dcp_async_save") and r["ranks"] == n
               and r.get("status") == "ok" for s in r["reps"]["restore_s"]]
    return _median(seconds)


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
    body = [(r["label"], str(r["ranks"]), fmt(r.get("stall_s")), fmt(r.get("total_s")),
             fmt(r.get("extra_rss_mb"), 0), fmt(r.get("restore_s")), _row_note(r)) for r in rows]
    return table(header, body)


def reshard_table(rows: list[dict[str, Any]]) -> str:
    header = ("restore at another world size", "restore s", "raw read s", "ratio", "note")
    body = [(r["label"], fmt(r.get("restore_s")), fmt(r.get("raw_read_s")), fmt(r.get("ratio_vs_raw_read")),
             f"{r.get('status')}: {r.get('note', '')}" if r.get("status") != "ok"
             else ("" if r.get("verified") else "RESTORED VALUES DIFFER"))
            for r in rows]
    return table(header, body)


_SCENARIO_TITLES = {ALL_CORES: "training, all cores busy", SPARE_CORE: "training, one core left free for the writer"}


def train_tables(rows: list[dict[str, Any]], windows: int) -> str:
    """A table per scenario: medians of `windows` interleaved windows, [min, max] beside them."""
    parts = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        title = f"{_SCENARIO_TITLES.get(scenario, scenario)}: medians of {windows} windows [min, max]"
        parts.append(title + "\n" + _train_table([r for r in rows if r["scenario"] == scenario]))
    return "\n\n".join(parts)


def _train_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "ranks", "threads", "steps/s", "vs none", "stall s", "cost per save s", "CPU s per save",
              "extra mem MB", "note")
    body = [(r["label"], str(r["ranks"]), str(r.get("threads_per_rank") or "-"),
             _with_spread(r, "steps_per_s"), fmt(r.get("ratio_vs_none")), fmt(r.get("stall_s")),
             _with_spread(r, "cost_per_save_s"), _with_spread(r, "cpu_s_per_save"), fmt(r.get("extra_mem_mb"), 0),
             f"{r.get('status')}: {r.get('note', '')}" if r.get("status") != "ok" else "")
            for r in rows]
    return table(header, body)


def _with_spread(row: dict[str, Any], key: str) -> str:
    spread = row.get(f"{key}_spread")
    if row.get(key) is None or spread is None:
        return "-"
    return f"{row[key]:.3f} [{spread[0]:.3f}, {spread[1]:.3f}]"


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


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{round(v, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0"


def table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
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
