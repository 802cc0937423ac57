"""The benchmark state: an MLP and its Adam state after one real optimizer step.

Every method is measured on this one object, built once per rank. Parameters are a third of its
bytes and Adam's `exp_avg` and `exp_avg_sq` the other two thirds; gradients are dropped after the
step, so they are not part of it. With two or more ranks the model is wrapped in DDP and every
rank holds the full, identical state, as in data-parallel training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DEPTH = 16  # Linear layers; the width is chosen so that the state reaches the requested size
BATCH = 32
SEED = 1234
_WIDTH_MULTIPLE = 64
_MUTATED_ELEMENTS = 1024


@dataclass
class BenchState:
    """What a method snapshots and restores; one per rank, identical on every rank."""

    module: nn.Module  # the model to snapshot (never the DDP wrapper)
    train_model: nn.Module  # what the training step runs: `module`, or DDP around it
    optimizer: torch.optim.Optimizer
    rank: int
    world_size: int
    width: int
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes of parameters and optimizer state on one rank."""
        return sum(t.nbytes for _, t in state_tensors(self))


def width_for(state_bytes: int) -> int:
    """The smallest width (a multiple of 64) whose state holds at least `state_bytes`."""
    # per layer: (w*w + w) float32 parameters, three copies (param, exp_avg, exp_avg_sq)
    per_layer = state_bytes / DEPTH / (3 * 4)
    width = math.ceil(math.sqrt(per_layer))
    return max(_WIDTH_MULTIPLE, math.ceil(width / _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE)


def build_state(state_bytes: int, rank: int, world_size: int) -> BenchState:
    """Build the model, take one optimizer step, drop the gradients.

    Example:
        state = build_state(1 << 30, rank=0, world_size=1)
    """
    width = width_for(state_bytes)
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(width, width))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    module = nn.Sequential(*layers)
    train_model: nn.Module = module
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    inputs = torch.randn(BATCH, width)
    targets = torch.randn(BATCH, width)
    state = BenchState(module, train_model, optimizer, rank, world_size, width, inputs, targets)
    train_step(state)
    return state


def train_step(state: BenchState) -> None:
    """One step: forward, backward (all-reduced by DDP), Adam, gradients freed."""
    out = state.train_model(state.inputs)
    loss = nn.functional.mse_loss(out, state.targets)
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


def train_steps(state: BenchState, steps: int, on_step: Callable[[int], None] | None = None,
                on_end: Callable[[], None] | None = None) -> float:
    """Run `steps` training steps and return the seconds they took.

    `on_step(step)` runs before the first step (step 0) and after each step, inside the timed
    window, and so does `on_end()` after the last one: a snapshot hook waits there for its last
    snapshot to commit. Ranks are not aligned here: a caller timing a window starts it after a
    barrier.

    Example:
        seconds = train_steps(state, 20, on_step=lambda step: None)
    """
    start = time.perf_counter()
    if on_step is not None:
        on_step(0)
    for step in range(1, steps + 1):
        train_step(state)
        if on_step is not None:
            on_step(step)
    if on_end is not None:
        on_end()
    return time.perf_counter() - start


def state_tensors(state: BenchState) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the state in a fixed order, detached views of the live storage."""
    out = [(f"model.{k}", v.detach()) for k, v in state.module.state_dict().items()]
    optim = state.optimizer.state_dict()["state"]
    for idx in sorted(optim):
        for k, v in optim[idx].items():
            if isinstance(v, torch.Tensor):
                out.append((f"optim.{idx}.{k}", v.detach()))
    return out


@torch.no_grad()
def mutate(state: BenchState) -> None:
    """Change the head and tail of every tensor, as the next training step would.

    Run right after a save returns: a method that returned before it had its own copy of the state
    restores these changed values, and the check after restore reports it.
    """
    for _, t in state_tensors(state):
        flat = t.view(-1)
        flat[:_MUTATED_ELEMENTS].add_(1)
        flat[-_MUTATED_ELEMENTS:].add_(1)
