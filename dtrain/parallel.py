"""How the model is spread over the ranks: replicated (DDP) or sharded (FSDP2's `fully_shard`).

Under `ddp` every rank holds the whole model and optimizer, and gradients are all-reduced once per
step, after the last micro-batch. Under `fsdp` each rank holds a shard of every parameter and of
its optimizer state (DTensors sharded along dim 0): each block is gathered only while it computes,
and gradients are reduce-scattered. Both average gradients over the ranks, so the trainer's loss
weighting gives the same step under either; and the model's state dict has the same keys and
logical content under either, which is what lets a snapshot saved under one resume under the other.

FSDP gathers parameters on every forward, so every rank must run the same number of them: the
trainer pads a rank with fewer micro-batches with empty ones (`micro_batch_count`).

Example::

    parallel = Parallel.wrap(model, "fsdp", ctx.device, "bf16", blocks=None)
    with parallel.accumulating(last=False):
        loss = loss_fn(parallel.module(x), y)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

BlockFinder = Callable[[torch.nn.Module], list[torch.nn.Module]]


@dataclass
class Parallel:
    module: torch.nn.Module
    """What the training step calls: the DDP wrapper, or the sharded model itself."""
    strategy: str

    @classmethod
    def wrap(cls, model: torch.nn.Module, strategy: str, device: torch.device, precision: str,
             blocks: BlockFinder | None = None) -> Parallel:
        if strategy == "fsdp":
            return cls(shard(model, device, precision, blocks), strategy)
        return cls(DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None), strategy)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """A micro-batch's forward and backward; gradients are synchronized only after the `last` one."""
        if last:
            yield
        elif self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            with self.module.no_sync():
                yield


def shard(model: torch.nn.Module, device: torch.device, precision: str, blocks: BlockFinder | None) -> torch.nn.Module:
    """`fully_shard` each block, then the whole model (which takes the parameters left over).
    Under bf16 parameters are gathered in bf16 and gradients reduced in fp32, as autocast computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for block in (blocks or default_blocks)(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def default_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every top-level child that has parameters (the items of a `ModuleList` or `ModuleDict`, which
    have no forward of their own), except those sharing a parameter with another (a tied embedding
    and head): sharding them apart would split one parameter between two FSDP units, so the root
    keeps it."""
    blocks = []
    for child in model.children():
        inner = child.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [child]
        blocks += [b for b in inner if any(True for _ in b.parameters())]
    owners: dict[int, int] = {}
    for b in blocks:
        for p in set(map(id, b.parameters())):
            owners[p] = owners.get(p, 0) + 1
    return [b for b in blocks if all(owners[id(p)] == 1 for p in b.parameters())]
