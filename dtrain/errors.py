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


class PreemptedError(DTrainError):
    """Training stopped on a preemption signal after its emergency snapshot was committed."""
