"""Numeric precision of a training step: autocast, the fp16 gradient scaler, and gradient clipping.

`fp32` runs as written. `bf16` runs forward and loss under autocast; bfloat16 has float32's range,
so gradients need no scaling. `fp16` adds a `torch.amp.GradScaler`: the loss is multiplied by a
scale before backward, steps whose gradients overflow are skipped and the scale backs off, and it
grows again after a run of good steps. That scale and its growth counter decide which future steps
are skipped, so they are training state: `MixedPrecision` is `Stateful` and goes into every
snapshot, and a resumed fp16 run continues with the same scale and skipped-step history.

Example::

    amp = MixedPrecision("bf16", device, clip_norm=1.0)
    with amp.autocast():
        loss = loss_fn(model(x), y)
    amp.backward(loss)
    grad_norm = amp.step(optimizer, model.parameters())
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and, for fp16, the gradient scaler; `step` unscales, clips and steps the optimizer."""

    def __init__(self, precision: str, device: torch.device, clip_norm: float = 0.0) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        self.precision = precision
        self.device_type = device.type
        self.clip_norm = clip_norm
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
             measure_norm: bool = False) -> float | None:
        """Unscale, clip to `clip_norm` if set, and step (skipped by the scaler after an overflow).
        Returns the global gradient norm before clipping when clipping or when `measure_norm`."""
        norm = None
        if self.clip_norm or measure_norm:
            self.scaler.unscale_(optimizer)  # clip and measure true gradients, not scaled ones
            params = list(params)
            if self.clip_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(optimizer)
        self.scaler.update()
        return None if norm is None else float(norm)

    @property
    def scale(self) -> float:
        """The fp16 loss scale now (1.0 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A snapshot saved without a scaler (fp32, bf16) leaves a fresh one: the run switched to fp16."""
        saved = state.get("scaler") or {}
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)

