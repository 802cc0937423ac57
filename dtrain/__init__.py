"""dtrain: fault-tolerant distributed training for PyTorch.

Committed, asynchronous, sharded snapshots; exact resume on any world size. The public API is
what this module exports; everything else is internal and may change.

    snap = dtrain.Snapshotter("runs/x", every_steps=100)
    sampler = dtrain.ResumableSampler(len(dataset), global_batch_size=256)
"""

from __future__ import annotations

__version__ = "0.1.0"

from dtrain.errors import (  # noqa: E402
    ConfigError,
    CorruptSnapshotError,
    DTrainError,
    NoSnapshotError,
    Preempted,
    SnapshotError,
)
from dtrain.sampler import ResumableSampler  # noqa: E402
from dtrain.snapshotter import Snapshotter  # noqa: E402

__all__ = [
    "ConfigError",
    "CorruptSnapshotError",
    "DTrainError",
    "NoSnapshotError",
    "Preempted",
    "ResumableSampler",
    "SnapshotError",
    "Snapshotter",
    "__version__",
]
