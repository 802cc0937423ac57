"""`dtrain status RUN_DIR [--json]`: the one line an operator wants when paged.

    runs/demo: running, step 312 of 400 at world size 2 (4 s ago); snapshot step 280 committed 12 s ago;
    saving step 320 (2 s); last event: resume from step 240 (3 min ago)

The step is the newest in metrics.jsonl, the snapshot the newest committed manifest on disk, a
save in flight a directory in `.pending/` while the run dir's lock holder lives.
"""

from __future__ import annotations

import time
from typing import Any

from dtrain.observe.sources import RunDir
from dtrain.observe.timeline import FINISHED, PREEMPTED, Timeline


def status(run: RunDir, now: float | None = None) -> dict[str, Any]:
    """The status as plain data (what `--json` prints)."""
    now = time.time() if now is None else now
    t = run.timeline()
    last_row = run.rows[-1] if run.rows else None
    newest = max(run.manifests) if run.manifests else None
    events = [r for r in run.rows if "event" in r and r["event"] != "snapshot"]
    return {
        "run_dir": run.url,
        "state": _state(run, t),
        "step": t.step,
        "total_steps": run.total_steps,
        "world_size": t.world_size,
        "last_record_age_s": _age(now, last_row["time"]) if last_row else None,
        "snapshot": None if newest is None else {
            "step": newest, "age_s": _age(now, run.manifests[newest].created_unix),
            "world_size": run.manifests[newest].world_size},
        "saving": [{"step": p.step, "age_s": _age(now, p.started_unix)} for p in run.pending] if run.is_running else [],
        "abandoned_saves": [] if run.is_running else [p.step for p in run.pending],
        "last_event": None if not events else {**events[-1], "age_s": _age(now, events[-1]["time"])},
        "attempts": len(t.attempts),
        "lock_holder": run.holder,
    }


def _state(run: RunDir, t: Timeline) -> str:
    """running, finished, preempted or stopped; unknown when the lock holder is on another host."""
    if run.is_running:
        return "running"
    if t.attempts and t.attempts[-1].end in (FINISHED, PREEMPTED):
        return t.attempts[-1].end
    return "stopped" if run.is_running is False or not run.holder else f"unknown (last held from host {run.holder['host']})"


def one_line(s: dict[str, Any]) -> str:
    parts = [f"{s['run_dir']}: {s['state']}, step {s['step']}"
             + (f" of {s['total_steps']}" if s["total_steps"] else "")
             + (f" at world size {s['world_size']}" if s["world_size"] else "")
             + (f" ({_ago(s['last_record_age_s'])})" if s["last_record_age_s"] is not None else "")]
    snap = s["snapshot"]
    parts.append(f"snapshot step {snap['step']} committed {_ago(snap['age_s'])}" if snap else "no committed snapshot")
    parts += [f"saving step {p['step']} ({_duration(p['age_s'])})" for p in s["saving"]]
    if s["abandoned_saves"]:
        parts.append(f"abandoned save(s) of step {', '.join(map(str, s['abandoned_saves']))} (removed at the next start)")
    if s["last_event"]:
        parts.append(f"last event: {_event(s['last_event'])} ({_ago(s['last_event']['age_s'])})")
    return "; ".join(parts)


def _event(e: dict[str, Any]) -> str:
    name, step = e["event"], e.get("step")
    if name == "resume":
        return f"resume from step {step} (saved at world size {e.get('saved_world_size')})"
    if name == "preempted":
        return f"preempted at step {step} by {e.get('signal')}"
    return f"{name} at step {step}"


def _age(now: float, then: float) -> float:
    return round(max(0.0, now - then), 1)


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
