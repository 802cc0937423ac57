"""`snapshot.every_steps = "auto"`: the snapshot interval from a measured save cost and an MTBF.

Young and Daly: with saves every tau seconds that each cost training C seconds, and failures a
mean time M apart, the time lost per second is about C/tau (saving) + tau/(2M) (work redone after
a failure, half an interval on average); it is least at tau = sqrt(2 * C * M).

C is what one save costs *training*, and an asynchronous save's stall is only part of it: the
evaluation that gives the snapshot its metrics, the copy-on-write faults training takes after a
fork, and the writer's share of the CPU all slow the steps while a save is in flight. So C is
measured rather than assumed: the loop's iteration times from the one that starts a save to the
one in which it commits, less what as many iterations take with no save in flight.

    meter = SaveCostMeter()
    meter.observe(0.040, in_flight=False)          # ... every iteration of the loop
    meter.save_started(stall_seconds=0.02)
    meter.observe(0.090, in_flight=True)           # the save's stall, and its first faults
    meter.observe(0.045, in_flight=False)          # it committed during this one
    young_daly_steps(meter.save_seconds, write_seconds=0.1, mtbf_seconds=3600, step_seconds=meter.step_seconds)
"""

from __future__ import annotations

import collections
import math
import statistics

_WINDOW = 64  # clean iterations behind the baseline: a median, so a stray slow step does not move it
_SAVES = 5  # measured saves behind the cost: a median, since one save's cost is noisy


class SaveCostMeter:
    """What one save costs training, in seconds, from the training loop's iteration times."""

    def __init__(self) -> None:
        self._clean: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._costs: collections.deque[float] = collections.deque(maxlen=_SAVES)
        self._open: float | None = None
        """Extra seconds of the save being measured so far; None when none is."""
        self._stall = 0.0
        """The stall of the save being measured: the least it can have cost."""

    @property
    def step_seconds(self) -> float | None:
        """An iteration with no save in flight (median of the recent ones); None before any."""
        return statistics.median(self._clean) if self._clean else None

    @property
    def save_seconds(self) -> float | None:
        """The training time one save costs (median of the recent measurements); None before one."""
        return statistics.median(self._costs) if self._costs else None

    def save_started(self, stall_seconds: float) -> None:
        """A save started in the current iteration and held training for `stall_seconds`; one still
        being measured ends here."""
        self._close()
        self._open, self._stall = 0.0, stall_seconds

    def observe(self, seconds: float, in_flight: bool) -> None:
        """One iteration took `seconds`; `in_flight`: the save being measured is still running at its end."""
        if self._open is None:
            self._clean.append(seconds)
            return
        self._open += seconds - (self.step_seconds or 0.0)
        if not in_flight:
            self._close()

    def _close(self) -> None:
        if self._open is not None:
            # Noise in the other steps can hide a cheap save, even make it look negative; its stall
            # was measured on its own and is a cost for certain. (A zero would mean: save every step.)
            self._costs.append(max(self._stall, self._open))
            self._open = None


def young_daly_steps(save_seconds: float, write_seconds: float, mtbf_seconds: float, step_seconds: float) -> int:
    """Young/Daly's interval, sqrt(2 * C * MTBF), in steps of `step_seconds` (at least 1).

    C = `save_seconds`, what one save costs training. A save that starts while the previous one
    still writes waits for it (the writer holds one in flight), a stall C does not count, so the
    interval is never shorter than a write.

        young_daly_steps(0.5, 2.0, 3600, 0.25) == 240    # sqrt(2 * 0.5 * 3600) = 60 s of 0.25 s steps
        young_daly_steps(0.001, 9.0, 3600, 0.25) == 36   # the 9 s write bounds it, not the 2.7 s optimum
    """
    seconds = max(math.sqrt(2 * save_seconds * mtbf_seconds), write_seconds)
    return max(1, math.ceil(seconds / step_seconds))
