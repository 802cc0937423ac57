"""Preemption: SIGTERM or SIGUSR1 becomes a flag that all ranks agree on at a step boundary.

SLURM (`--signal`, `scancel`), Kubernetes (pod deletion) and torchrun (on its own SIGTERM) all
deliver SIGTERM, or SIGUSR1 ahead of time, to the workers. The handler only records the signal;
the training loop all-reduces the flag once per step, so every rank stops at the same step, saves
it, and exits with `EXIT_PREEMPTED` (`dtrain.Preempted`).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later", which is what a requeue does


class PreemptionFlag:
    """Records the first preemption signal this process receives.

    While one is installed, every child this process forks (DataLoader workers) ignores the
    preemption signals: torchrun and SLURM signal the worker's whole process group, and a
    DataLoader worker that died of it would fail the step before the emergency snapshot is taken.
    The children still end with their parent (the DataLoader stops them, or sees its parent gone).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def is_requested(self) -> bool:
        return self.signum is not None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        _installed.add(self)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _installed.discard(self)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum


_installed: set[PreemptionFlag] = set()


def _ignore_in_forked_child() -> None:
    """Ignored, and blocked as well: a DataLoader worker installs a SIGTERM handler of its own that
    exits, and a blocked signal is never delivered whatever handler is installed."""
    if _installed:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        _installed.clear()


os.register_at_fork(after_in_child=_ignore_in_forked_child)


def signal_name(signum: int | None) -> str:
    """`SIGTERM` for 15; empty for no signal (this rank received none)."""
    return "" if signum is None else signal.Signals(signum).name
