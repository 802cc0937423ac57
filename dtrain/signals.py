"""Preemption: SIGTERM or SIGUSR1 becomes a flag that all ranks agree on at a step boundary.

SLURM (`--signal`, `scancel`), Kubernetes (pod deletion) and torchrun (on its own SIGTERM) all
deliver SIGTERM, or SIGUSR1 ahead of time, to the workers. The handler only records the signal;
the training loop all-reduces the flag once per step, so every rank stops at the same step, saves
it, and exits with `EXIT_PREEMPTED` (`dtrain.Preempted`).
"""

from __future__ import annotations

import signal
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later", which is what a requeue does


class PreemptionFlag:
    """Records the first preemption signal this process receives."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def is_requested(self) -> bool:
        return self.signum is not None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum


def signal_name(signum: int | None) -> str:
    """`SIGTERM` for 15; empty for no signal (this rank received none)."""
    return "" if signum is None else signal.Signals(signum).name
