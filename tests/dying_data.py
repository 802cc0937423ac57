"""A training set whose DataLoader worker dies (SIGKILL, as the kernel's OOM killer does) reading one sample."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from dtrain.examples import teacher

FATAL_SAMPLE = 100


class DyingInWorker(torch.utils.data.Dataset):
    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        if i == FATAL_SAMPLE and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[i]


def build_datasets(options: dict[str, Any]) -> tuple[DyingInWorker, Any]:
    train, held_out = teacher.build_datasets(options)
    return DyingInWorker(train), held_out
