"""The run report's figures, drawn with matplotlib and returned as inline SVG.

Every marked thing carries an SVG id (matplotlib's `gid`), so a test or a browser can find it:
`snapshot-<step>`, `save-failed-<step>`, `restart-<attempt>`, `world-<attempt>`, `replayed-<attempt>`,
`recovery-<attempt>`.
"""

from __future__ import annotations

import io
from itertools import pairwise

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dtrain.observe.timeline import FAILED, KILLED, PREEMPTED, Point, Timeline

END_COLORS = {KILLED: "#d62728", PREEMPTED: "#9467bd", FAILED: "#222222"}
KEPT, SUPERSEDED, VAL, REPLAYED, RECOVERY = "#1f77b4", "#9a9a9a", "#ff7f0e", "#ffbb78", "#f4a6a6"
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "dtrain-report", "font.size": 9}
"""Text stays text (small, searchable); fixed ids make the same run give the same SVG."""


def loss_by_step(t: Timeline) -> str:
    """Train and val loss against step: one curve, superseded rows faint, every fault marked."""
    with matplotlib.rc_context(SVG_STYLE):
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        ax = fig.add_subplot()
        _curves(ax, t.train, lambda p: p.step, "train loss")
        val = [p for p in t.val if p.kept]
        if val:
            ax.plot([p.step for p in val], [p.value for p in val], "o-", color=VAL, ms=3, lw=1, label="val loss")
        for attempt, first, last in t.replayed_spans():
            ax.axvspan(first, last, color=REPLAYED, alpha=0.5, lw=0, gid=f"replayed-{attempt.index}",
                       label=_once(ax, "replayed steps"))
        _restarts_by_step(ax, t)
        _snapshot_rug(ax, [(s.step, s.committed) for s in t.snapshots])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        _finish(ax)
        return _svg(fig)


def by_wall_time(t: Timeline) -> str:
    """Step reached (above) and train loss (below) against the time since the run started."""
    with matplotlib.rc_context(SVG_STYLE):
        fig = Figure(figsize=(10, 5.2), layout="constrained")
        steps, losses = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        t0 = t.attempts[0].start_time if t.attempts else 0.0
        unit, scale = _time_unit(t.goodput().wall_s)
        at = lambda seconds: (seconds - t0) / scale  # noqa: E731
        for a in t.attempts:  # from its start, through its train rows, to the last step it recorded
            mine = [p for p in t.train if p.attempt == a.index]
            steps.plot([at(a.start_time), *(at(p.time) for p in mine), at(a.end_time)],
                       [a.start_step, *(p.step for p in mine), a.end_step],
                       "-", lw=1.2, label=f"attempt {a.index} (world {a.world_size})")
        _fault_free_line(steps, t, at)
        _curves(losses, t.train, lambda p: at(p.time), "train loss")
        for ax, ids in ((steps, True), (losses, False)):  # ids once: they must be unique in the page
            _recoveries(ax, t, at, ids)
        _snapshot_rug(steps, [(at(s.time), s.committed) for s in t.snapshots], ids=False)
        steps.set_ylabel("step")
        losses.set_ylabel("train loss")
        losses.set_xlabel(f"{unit} since the run started")
        _finish(steps)
        return _svg(fig)


def _curves(ax: Axes, points: list[Point], x, label: str) -> None:
    """The kept curve, and each attempt's superseded rows as a faint dashed line."""
    for attempt in sorted({p.attempt for p in points if p.kept}):  # no line across a restart
        kept = [p for p in points if p.attempt == attempt and p.kept]
        ax.plot([x(p) for p in kept], [p.value for p in kept], "-", color=KEPT, lw=1.4, label=_once(ax, label))
    for attempt in sorted({p.attempt for p in points if not p.kept}):
        lost = [p for p in points if p.attempt == attempt and not p.kept]
        ax.plot([x(p) for p in lost], [p.value for p in lost], "--", color=SUPERSEDED, lw=1, zorder=3,
                label=_once(ax, "superseded (replayed after a restart)"))


def _restarts_by_step(ax: Axes, t: Timeline) -> None:
    for prev, a in pairwise(t.attempts):
        color = END_COLORS.get(prev.end, "#444444")
        ax.axvline(a.start_step, color=color, lw=1.2, gid=f"restart-{a.index}", label=_once(ax, f"restart: {prev.end}"))
        ax.text(a.start_step, 0.98, f" {prev.end}", transform=ax.get_xaxis_transform(), color=color,
                va="top", ha="left", rotation=90, fontsize=8)
    for a, before in t.world_changes():
        ax.text(a.start_step, 0.5, f" world {before}\u2192{a.world_size}", transform=ax.get_xaxis_transform(),
                color="#2ca02c", va="center", ha="left", rotation=90, fontsize=8, gid=f"world-{a.index}")


def _time_unit(wall_s: float) -> tuple[str, float]:
    """Seconds, minutes or hours, whichever keeps the axis' numbers readable."""
    if wall_s < 300:
        return "seconds", 1.0
    return ("minutes", 60.0) if wall_s < 300 * 60 else ("hours", 3600.0)


def _recoveries(ax: Axes, t: Timeline, at, ids: bool) -> None:
    for prev, a in pairwise(t.attempts):
        ax.axvspan(at(prev.end_time), at(a.start_time), color=RECOVERY, alpha=0.6, lw=0,
                   gid=f"recovery-{a.index}" if ids else None, label=_once(ax, "recovery (restart to first new step)"))
        ax.axvline(at(prev.end_time), color=END_COLORS.get(prev.end, "#444444"), lw=1)


def _fault_free_line(ax: Axes, t: Timeline, at) -> None:
    """From the start to the step reached, at the fault-free rate: the gap to the real curve is what faults cost."""
    rate = t.goodput().fault_free_steps_per_s
    if rate and t.attempts:
        first = t.attempts[0]
        done = first.start_time + (t.step - first.start_step) / rate
        ax.plot([at(first.start_time), at(done)], [first.start_step, t.step],
                ":", color="#555555", lw=1, label="at the fault-free rate")


MARKED_ONE_BY_ONE = 400
"""Up to this many saves each get an artist of their own (an SVG id); more are drawn as one, to keep the file small."""


def _snapshot_rug(ax: Axes, marks: list[tuple[float, bool]], ids: bool = True) -> None:
    """Committed snapshots as ticks along the bottom; failed saves as red crosses."""
    for committed, marker, color, label, prefix in [(True, "|", "#2ca02c", "committed snapshot", "snapshot"),
                                                    (False, "x", "#d62728", "failed save", "save-failed")]:
        xs = [x for x, c in marks if c == committed]
        one_by_one = ids and len(xs) <= MARKED_ONE_BY_ONE
        for group in ([[x] for x in xs] if one_by_one else [xs] if xs else []):
            ax.plot(group, [0.03] * len(group), marker, color=color, ms=10, ls="none",
                    transform=ax.get_xaxis_transform(), label=_once(ax, label),
                    gid=f"{prefix}-{group[0]:g}" if one_by_one else None)


def _once(ax: Axes, label: str) -> str:
    """`label` the first time it is used on `ax` (one legend entry each), else hidden from the legend."""
    return "_nolegend_" if label in ax.get_legend_handles_labels()[1] else label


def _finish(ax: Axes) -> None:
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)  # beside: never over data


def _svg(fig: Figure) -> str:
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    return text[text.index("<svg"):]  # inline: no XML declaration or doctype
