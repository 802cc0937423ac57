"""dtrain: fault-tolerant distributed training for PyTorch.

Committed, asynchronous, sharded snapshots; exact resume on any world size.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dtrain.config import Config, load_config  # noqa: E402
from dtrain.errors import (  # noqa: E402
    ConfigError,
    CorruptSnapshotError,
    DTrainError,
    NoSnapshotError,
    PreemptedError,
    SnapshotError,
)

__all__ = [
    "Config",
    "ConfigError",
    "CorruptSnapshotError",
    "DTrainError",
    "NoSnapshotError",
    "PreemptedError",
    "SnapshotError",
    "__version__",
    "load_config",
]
