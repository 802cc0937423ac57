"""`dtrain report RUN_DIR`: one self-contained HTML file telling what happened in a run.

    html = render(read_run_dir(Path("runs/demo")))
    Path("report.html").write_text(html)

The loss against step and against wall time (inline SVG, see `plots`), with every committed
snapshot, restart (and its cause where one was recorded), world-size change and replayed span
marked; the attempts table; goodput. No script, no stylesheet or font from the network: it opens
offline. Tables carry `data-*` attributes so that tests can read the figures back.
"""

from __future__ import annotations

import html
import time
from typing import Any

from dtrain.observe import plots
from dtrain.observe.sources import RunDir
from dtrain.observe.timeline import END_MEANING, Attempt, Timeline

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.5em; }
dl.summary dt { color: #555; } dl.summary dd { margin: 0; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.plot svg { width: 100%; height: auto; }
.end-killed { color: #d62728; } .end-preempted { color: #9467bd; } .end-failed { color: #222; font-weight: 700; }
"""


def render(run: RunDir, now: float | None = None) -> str:
    t = run.timeline()
    now = time.time() if now is None else now
    body = [
        f"<h1>dtrain run report: {_e(run.name)}</h1>",
        f'<p class="sub">{_e(run.url)}, written {_when(now)}</p>',
        _summary(run, t),
        _section("loss-by-step", "Loss by step", plots.loss_by_step(t) if t.attempts else "<p>No rows yet.</p>",
                 "Each step once, from the attempt that trained it last; faint dashes: steps a killed attempt "
                 "trained past the snapshot its successor resumed from. Vertical lines: restarts, by how the "
                 "attempt before ended; shaded: replayed steps; ticks: committed snapshots."),
        _section("wall-time", "Over wall time", plots.by_wall_time(t) if t.attempts else "",
                 "Shaded: recovery, from an attempt's last record to its successor's first new step. Dotted: "
                 "where the run would be at its fault-free rate."),
        "<h2>Attempts</h2>", _attempts_table(t),
        "<h2>Events</h2>", _events_table(t),
        "<h2>Snapshots</h2>", _snapshots_table(run, t),
    ]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>dtrain report: '
            f"{_e(run.name)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _summary(run: RunDir, t: Timeline) -> str:
    g = t.goodput()
    committed = [s for s in t.snapshots if s.committed]
    items = {
        "step": f"{t.step}" + (f" of {run.total_steps}" if run.total_steps else ""),
        "attempts": f"{len(t.attempts)} ({_causes(t)})",
        "world sizes": " \u2192 ".join(str(a.world_size) for a in t.attempts) or "-",
        "snapshots": f"{len(committed)} committed, {len(t.snapshots) - len(committed)} failed, "
                     f"{len(run.manifests)} on disk",
        "steps replayed": str(sum(a.steps_replayed for a in t.attempts)),
        "wall time": _duration(g.wall_s),
        "goodput": f"{g.steps_per_s:.3g} steps/s kept" + (
            f" against {g.fault_free_steps_per_s:.3g} fault-free ({g.ratio:.0%})" if g.ratio is not None else ""),
    }
    rows = "".join(f'<dt>{_e(k)}</dt><dd data-key="{_e(k)}">{_e(v)}</dd>' for k, v in items.items())
    return f'<dl class="summary" id="summary">{rows}</dl>'


def _causes(t: Timeline) -> str:
    ends = [a.end for a in t.attempts]
    return ", ".join(f"{ends.count(e)} {e}" for e in dict.fromkeys(ends))


def _section(ident: str, title: str, svg: str, note: str) -> str:
    return f'<h2>{_e(title)}</h2><div class="plot" id="{ident}">{svg}</div><p class="sub">{_e(note)}</p>'


ATTEMPT_COLUMNS = ["attempt", "started", "ended", "world_size", "from_step", "to_step", "steps_gained",
                   "steps_replayed", "recovery_s", "end"]


def _attempts_table(t: Timeline) -> str:
    head = "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in ATTEMPT_COLUMNS)
    rows = "".join(_attempt_row(a) for a in t.attempts)
    return f'<table id="attempts"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _attempt_row(a: Attempt) -> str:
    values: dict[str, Any] = {
        "attempt": a.index, "started": _when(a.start_time), "ended": _when(a.end_time), "world_size": a.world_size,
        "from_step": a.start_step, "to_step": a.end_step, "steps_gained": a.steps_gained,
        "steps_replayed": a.steps_replayed, "recovery_s": "" if a.recovery_s is None else f"{a.recovery_s:.1f}",
        "end": a.end + (f" ({a.signal})" if a.signal else ""),
    }
    cells = "".join(f'<td data-key="{k}"{_end_class(k, a)}>{_e(str(values[k]))}</td>' for k in ATTEMPT_COLUMNS)
    return f'<tr data-attempt="{a.index}" title="{_e(END_MEANING[a.end])}">{cells}</tr>'


def _end_class(key: str, a: Attempt) -> str:
    return f' class="text end-{a.end}"' if key == "end" else ""


def _events_table(t: Timeline) -> str:
    rows = []
    for attempt, row in t.events:
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("time", "event", "step"))
        rows.append(f'<tr data-event="{_e(str(row["event"]))}" data-step="{row.get("step", "")}">'
                    f"<td>{_when(row['time'])}</td><td>{attempt}</td><td class=\"text\">{_e(str(row['event']))}</td>"
                    f"<td>{row.get('step', '')}</td><td class=\"text\">{_e(details)}</td></tr>")
    for s in t.snapshots:
        if not s.committed:
            rows.append(f'<tr data-event="save-failed" data-step="{s.step}"><td>{_when(s.time)}</td>'
                        f'<td>{s.attempt}</td><td class="text">save failed</td><td>{s.step}</td>'
                        f'<td class="text">{_e(str(s.row.get("error")))}</td></tr>')
    head = "<tr><th>time</th><th>attempt</th><th>event</th><th>step</th><th>details</th></tr>"
    return f'<table id="events"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _snapshots_table(run: RunDir, t: Timeline) -> str:
    rows = []
    for s in (s for s in t.snapshots if s.committed):
        r = s.row
        rows.append(f'<tr data-step="{s.step}"><td>{s.step}</td><td>{_when(s.time)}</td><td>{s.attempt}</td>'
                    f"<td>{_num(r.get('bytes'), 1e-6, '.2f')}</td><td>{_num(r.get('stall_s'), 1, '.3f')}</td>"
                    f"<td>{_num(r.get('write_s'), 1, '.3f')}</td><td>{r.get('interval_steps') or ''}</td>"
                    f"<td>{'yes' if s.step in run.manifests else 'deleted'}</td></tr>")
    head = ("<tr><th>step</th><th>committed</th><th>attempt</th><th>MB</th><th>stall s</th><th>write s</th>"
            "<th>interval</th><th>on disk</th></tr>")
    return f'<table id="snapshots"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _num(value: Any, scale: float, fmt: str) -> str:
    return format(value * scale, fmt) if isinstance(value, int | float) else ""


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) + " UTC"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
