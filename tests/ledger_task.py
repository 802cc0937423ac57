"""The tied example's task, its training set recording every batch it reads: a data ledger for runs
launched by torchrun, where no hook can be passed in. Each rank appends one line per batch (the
sample ids of its share, in order) to `$DTRAIN_TEST_LEDGER.rank<R>`; with no DataLoader workers a
batch is read exactly when its step is trained."""

from __future__ import annotations

import os
from typing import Any

import torch

from dtrain.examples import tied
from dtrain.examples.tied import build_model, build_optimizer, build_scheduler, per_sample_loss  # noqa: F401


class Ledgered(torch.utils.data.Dataset):
    def __init__(self, inner: tied.SequenceDataset, path: str) -> None:
        self.inner, self.path = inner, path

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        return self.inner[i]

    def __getitems__(self, ids: list[int]) -> Any:
        with open(f"{self.path}.rank{os.environ['RANK']}", "a") as ledger:
            ledger.write(" ".join(map(str, ids)) + "\n")
        return self.inner.__getitems__(ids)


def build_datasets(options: dict[str, Any]) -> tuple[Ledgered, tied.SequenceDataset]:
    train, evaluation = tied.build_datasets(options)
    return Ledgered(train, os.environ["DTRAIN_TEST_LEDGER"]), evaluation
