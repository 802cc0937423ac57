"""The user's model, data, optimizer, scheduler and loss, named by `module:function` in the config."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dtrain.config import TaskConfig
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class Task:
    build_model: Callable[[dict[str, Any]], Any]
    build_data: Callable[[dict[str, Any]], tuple[Any, Any]]
    build_optimizer: Callable[[Any, dict[str, Any]], Any]
    build_scheduler: Callable[[Any, dict[str, Any]], Any] | None
    per_sample_loss: Callable[[Any, Any], Any]
    options: dict[str, Any]


def load_task(cfg: TaskConfig) -> Task:
    """Import every entry point now, so a typo fails before any process group or file exists."""
    return Task(
        build_model=resolve("task.model", cfg.model),
        build_data=resolve("task.data", cfg.data),
        build_optimizer=resolve("task.optimizer", cfg.optimizer),
        build_scheduler=resolve("task.scheduler", cfg.scheduler) if cfg.scheduler else None,
        per_sample_loss=resolve("task.loss", cfg.loss),
        options=dict(cfg.options),
    )


def resolve(key: str, spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as e:  # TypeError: a relative path such as ".mod"
        raise ConfigError(f"{key} = {spec!r}: cannot import module {module_name!r} ({e}); "
                          "install it or fix the module path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} has no function {attr!r}; "
                          "fix the name after the colon")
    return fn
