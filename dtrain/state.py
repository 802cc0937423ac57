"""What a snapshot asks of the objects it saves (`Stateful`), and each rank's generators.

`Stateful` is the whole protocol a snapshot needs from an object. RNG on resume: when the world
size is unchanged each rank gets its own saved generators back, so the resumed run is the same
bit for bit. On a new world size a saved stream has no owner, so every rank re-derives its
generators from `(seed, step, rank)`: still reproducible, and distinct per rank.
"""

from __future__ import annotations

import random
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dtrain import __version__

RNG_KEY = "rng"
"""The key of a rank's generators among its per-rank state."""


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class RNGState:
    """This rank's python, numpy, torch and (when present) CUDA generators."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": _python_state_to_json(random.getstate()),
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_python_state_from_json(state["python"]))
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def make_sharded_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer over sharded parameters (FSDP's DTensors) its state before a restore.

    Restore reads each rank's rows into live DTensors; an optimizer that has not stepped has no
    state tensors to read into, and `load_state_dict` alone would make whole tensors on every rank.
    One step with zero gradients at learning rate 0 makes the state (as torch.distributed.checkpoint
    does); the restore then overwrites it, and the parameters, whole.
    """
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if optimizer.state or not any(isinstance(p, DTensor) for p in params):
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    made = [p for p in params if p.grad is None]
    for p in made:
        p.grad = torch.zeros_like(p)
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
        for p in made:
            p.grad = None


def seed_all(seed: int, step: int, rank: int) -> None:
    """Derive every generator of this rank from (seed, step, rank); used at start and on a world-size change."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)
    value = int(mixed[0]) % (1 << 63)
    random.seed(value)
    np.random.seed(int(mixed[1]) % (1 << 32))
    torch.manual_seed(value)


def versions() -> dict[str, str]:
    """What a snapshot records of the software that wrote it."""
    import platform

    return {"dtrain": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_dict(d: dict[str, Any]) -> tuple:
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["kind"], keys, d["pos"], d["has_gauss"], d["cached_gaussian"])
