"""Model weights out of a snapshot, for inference."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from dtrain.snapshot import catalog, reader
from dtrain.snapshot.tree import unflatten
from dtrain.storage import Storage

logger = logging.getLogger(__name__)


def export_safetensors(storage: Storage, step: int | None, out: Path, best: bool = False) -> int:
    """Write the model of snapshot `step` (default: the newest, or the best with `best`) to `out`.

    The file holds the model's state dict under its own names and nothing that varies between
    runs, so equal weights give equal bytes.
    """
    if step is None:
        step = catalog.best_step(storage) if best else catalog.newest_step(storage)
    manifest, tensors = reader.read_tensors(storage, step, "model/")
    state = unflatten(manifest.objects["model"], tensors)
    weights = _unshared({name: t for name, t in state.items() if isinstance(t, torch.Tensor)})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"format": "pt"})
    logger.info("exported %d tensors of step %d to %s", len(weights), step, out)
    return step


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory: safetensors refuses tied tensors (an embedding and its
    tied head), so each name after the first of a storage gets its own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.contiguous() if ptr not in seen or t.numel() == 0 else t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
    return out
