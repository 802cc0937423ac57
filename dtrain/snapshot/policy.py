"""When to save: small policies that each answer one question, "is a save due after this step?".

Each policy gives this rank's opinion from what it sees (the step, its clock, its measurements).
Opinions that rest on a rank's own clock or timings can differ between ranks, so the caller
combines every policy's opinion over all ranks in one all-reduce (`DistContext.any`) and saves
when any rank finds one due: every rank then saves the same step.

    policies = policies_from(cfg)           # every N steps, every T seconds, epoch end, or Young/Daly
    due = [p.is_due(progress) for p in policies]
    ...agree...; if any: save, then p.saved(progress) for every policy
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from dtrain.config import AUTO, SnapshotConfig
from dtrain.snapshot.interval import SaveCostMeter, young_daly_steps

logger = logging.getLogger(__name__)

AUTO_FIRST_STEP = 10
"""Under `every_steps = "auto"`, the first save comes this many steps after a start: it measures what a save costs."""


@dataclass(frozen=True)
class Progress:
    """What a policy may look at after a step."""

    step: int
    epoch_ended: bool = False
    """The step consumed the last batch of an epoch."""
    now: float = 0.0
    """`time.monotonic()` after the step."""


class SavePolicy(Protocol):
    reason: str
    """Names the policy in the log: `snapshot of step N (reason)`."""

    def is_due(self, p: Progress) -> bool: ...

    def saved(self, p: Progress) -> None:
        """A save of `p.step` started (whichever policy asked for it)."""
        ...


class EverySteps:
    reason = "interval"

    def __init__(self, every: int) -> None:
        self.every = every

    def is_due(self, p: Progress) -> bool:
        return self.every > 0 and p.step % self.every == 0

    def saved(self, p: Progress) -> None:
        pass


class EverySeconds:
    """Due when `every` seconds passed since the last save (or the start)."""

    reason = "time"

    def __init__(self, every: float, start: float | None = None) -> None:
        self.every = every
        self.last = time.monotonic() if start is None else start

    def is_due(self, p: Progress) -> bool:
        return self.every > 0 and p.now - self.last >= self.every

    def saved(self, p: Progress) -> None:
        self.last = p.now


class AtEpochEnd:
    reason = "epoch end"

    def is_due(self, p: Progress) -> bool:
        return p.epoch_ended

    def saved(self, p: Progress) -> None:
        pass


class YoungDaly:
    """`every_steps = "auto"`: Young/Daly's interval from the measured cost of a save and the MTBF.

    The cost is measured from the loop's iteration times (`SaveCostMeter`), so each rank's opinion
    rests on its own timings. The interval counts from the last save, or the step resumed at.
    """

    reason = "interval"

    def __init__(self, mtbf_seconds: float, start_step: int = 0) -> None:
        self.mtbf_seconds = mtbf_seconds
        self.meter = SaveCostMeter()
        self.last_step = start_step
        self.write_seconds: float | None = None
        """How long the newest committed save took to write, once known."""
        self.is_measuring = False
        """A save is in flight whose cost is not known yet."""
        self._logged: float | None = None

    def observe(self, seconds: float, saving: bool) -> None:
        """One iteration of the loop (step, evaluation, save) took `seconds`; `saving`: a save is still in flight."""
        self.meter.observe(seconds, in_flight=saving)
        self.is_measuring = saving and self.is_measuring

    def save_started(self, stall_seconds: float) -> None:
        self.meter.save_started(stall_seconds)
        self.is_measuring = True

    def interval(self) -> int | None:
        """The interval in steps; None until one save was measured."""
        save, step = self.meter.save_seconds, self.meter.step_seconds
        if save is None or not step or self.write_seconds is None:
            return None
        interval = young_daly_steps(save, self.write_seconds, self.mtbf_seconds, step)
        if save != self._logged:  # once per measured save, not per step
            logger.info("every_steps=auto: %d steps (a save costs training %.3fs and writes for %.3fs; "
                        "steps of %.4fs; mtbf_seconds=%g)", interval, save, self.write_seconds, step, self.mtbf_seconds)
            self._logged = save
        return interval

    def is_due(self, p: Progress) -> bool:
        interval = self.interval()
        if interval is None and self.is_measuring:
            return False  # the bootstrap save is still being measured: another would only queue behind it
        return p.step - self.last_step >= (interval or AUTO_FIRST_STEP)

    def saved(self, p: Progress) -> None:
        self.last_step = p.step


def policies_from(cfg: SnapshotConfig, start_step: int = 0) -> list[SavePolicy]:
    """The policies `snapshot.*` asks for, counting from `start_step` (a resumed run's step)."""
    policies: list[SavePolicy] = []
    if cfg.every_steps == AUTO:
        policies.append(YoungDaly(cfg.mtbf_seconds, start_step))
    elif cfg.every_steps > 0:
        policies.append(EverySteps(cfg.every_steps))
    if cfg.every_seconds > 0:
        policies.append(EverySeconds(cfg.every_seconds))
    if cfg.at_epoch_end:
        policies.append(AtEpochEnd())
    return policies
