"""The exceptions dtrain raises, under one base so callers can catch them together.

Every message names the field or path, the bad value and the fix.
"""

from __future__ import annotations


class DTrainError(Exception):
    """Base of every error dtrain raises on purpose."""


class ConfigError(DTrainError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class SnapshotError(DTrainError):
    """A snapshot could not be written or committed."""


class CorruptSnapshotError(SnapshotError):
    """A committed snapshot fails verification: a file is missing, truncated or altered."""


class UnsafeSnapshotError(CorruptSnapshotError):
    """A snapshot's manifest is hostile or absurd: a path escaping the snapshot, impossible sizes."""


class NoSnapshotError(SnapshotError):
    """A run dir holds no committed snapshot where one is required."""


class Preempted(SystemExit):
    """Training stopped at `step` on a preemption signal (SIGTERM, SIGUSR1) once that step's snapshot
    was committed. A `SystemExit` with code 75 (EX_TEMPFAIL): uncaught, the process exits 75, which
    launchers read as "requeue and run the same command to resume", and `except Exception` in a
    training loop does not swallow it."""

    EXIT_CODE = 75

    def __init__(self, step: int) -> None:
        super().__init__(self.EXIT_CODE)
        self.step = step

    def __str__(self) -> str:
        return f"preempted at step {self.step}; its snapshot is committed, restart to resume"
