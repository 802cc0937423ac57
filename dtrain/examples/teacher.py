"""The built-in task: a student MLP learns to classify points labelled by a fixed random teacher.

The data is generated locally from a seed (nothing is downloaded), so every process builds the
same dataset. The loss falls visibly within a few hundred steps. Options (`[task.options]`):
`num_samples`, `eval_samples`, `dim`, `classes`, `hidden`, `layers`, `dropout`, `lr`,
`weight_decay`, `warmup_steps`, `data_seed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULTS: dict[str, Any] = {
    "num_samples": 8192, "eval_samples": 1024, "dim": 32, "classes": 10, "hidden": 256, "layers": 2,
    "dropout": 0.1, "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 20, "data_seed": 1234,
}


def _opt(options: dict[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


class PointDataset(torch.utils.data.Dataset):
    """(point, label) pairs held as two tensors; fetches a batch with one index operation."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i], self.labels[i]

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(ids, dtype=torch.long)
        return self.points[index], self.labels[index]


def build_datasets(options: dict[str, Any]) -> tuple[PointDataset, PointDataset]:
    g = torch.Generator().manual_seed(_opt(options, "data_seed"))
    dim, classes = _opt(options, "dim"), _opt(options, "classes")
    teacher = [torch.randn(dim, 64, generator=g), torch.randn(64, classes, generator=g)]
    total = _opt(options, "num_samples") + _opt(options, "eval_samples")
    points = torch.randn(total, dim, generator=g)
    labels = (torch.tanh(points @ teacher[0]) @ teacher[1]).argmax(dim=1)
    n = _opt(options, "num_samples")
    return PointDataset(points[:n], labels[:n]), PointDataset(points[n:], labels[n:])


def build_model(options: dict[str, Any]) -> nn.Module:
    width, dropout = _opt(options, "hidden"), _opt(options, "dropout")
    layers: list[nn.Module] = []
    fan_in = _opt(options, "dim")
    for _ in range(_opt(options, "layers")):
        layers += [nn.Linear(fan_in, width), nn.GELU(), nn.Dropout(dropout)]
        fan_in = width
    layers.append(nn.Linear(fan_in, _opt(options, "classes")))
    return nn.Sequential(*layers)


def build_optimizer(params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=_opt(options, "lr"), weight_decay=_opt(options, "weight_decay"))


def build_scheduler(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> Any:
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=_opt(options, "warmup_steps"))


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target, reduction="none")
