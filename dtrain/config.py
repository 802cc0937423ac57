"""The run configuration: a tree of frozen dataclasses, read from TOML plus `--set` overrides.

Every field below carries a one-line docstring; `validate()` checks ranges once the tree is
built. Unknown sections and keys are errors (with the closest known name as the fix), since a
misspelled `snapshot.keep_lst` silently ignored would delete snapshots the user meant to keep.

Example::

    cfg = load_config("examples/demo.toml", ["train.steps=500", "snapshot.keep_last=2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError

AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    """Total optimizer steps; may be raised when resuming, to extend a run."""
    global_batch_size: int = 64
    """Samples per optimizer step over all ranks, the same on any world size."""
    seed: int = 0
    """Seeds the model init, the data order and every rank's generators."""
    eval_every_steps: int = 0
    """Evaluate every N steps; 0 evaluates only when a snapshot is taken and at the end."""
    log_every_steps: int = 10
    """A progress line every N steps when stderr is not a terminal."""
    device: str = AUTO
    """`auto` (CUDA when present, else CPU), `cpu` or `cuda`."""
    micro_batch_size: int = 0
    """Samples per forward/backward pass on a rank; its share is split into micro-batches whose gradients accumulate (0: the whole share in one pass)."""
    precision: str = "fp32"
    """`fp32`, `bf16` (autocast) or `fp16` (autocast with a gradient scaler, whose state is in every snapshot)."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value before each optimizer step; 0 disables (the norm is logged either way)."""


@dataclass(frozen=True)
class SnapshotConfig:
    every_steps: int | str = 50
    """Snapshot every N steps (0 = never by count), or `auto` to derive N from save cost and MTBF."""
    every_seconds: float = 0.0
    """Also snapshot when this many seconds passed since the last one; 0 disables."""
    at_epoch_end: bool = False
    """Also snapshot after the last step of each epoch."""
    keep_last: int = 3
    """Keep the newest K committed snapshots (at least 1)."""
    keep_best: int = 0
    """Also keep the best K by `best_metric`; 0 disables."""
    best_metric: str = "val_loss"
    """The metric that ranks snapshots for `keep_best` and for export of the best model."""
    best_mode: str = "min"
    """`min` or `max`: whether a lower or a higher `best_metric` is better."""
    keep_every: int = 0
    """Keep every snapshot whose step is a multiple of M (milestones); 0 disables."""
    max_consecutive_failures: int = 3
    """Stop training after this many failed saves in a row; earlier failures only warn."""
    timeout_seconds: float = 600.0
    """How long rank 0 waits for every rank's shard before it abandons a save."""
    file_mb: int = 64
    """Target size of one shard file; large tensors are split across files of this size."""
    staging: str = AUTO
    """How a save is staged: `copy` (into reused host buffers, then a background write; `auto` is copy) or `fork` (a copy-on-write child)."""
    memory_budget_mb: int = 0
    """Fork staging: bound on the host memory a save may hold once training goes on (0: this rank's share); a lower bound lengthens the stall."""
    mtbf_seconds: float = 3600.0
    """Assumed mean time between failures, used only when `every_steps = "auto"`."""


@dataclass(frozen=True)
class TaskConfig:
    model: str = "dtrain.examples.teacher:build_model"
    """`module:function(options) -> torch.nn.Module`."""
    data: str = "dtrain.examples.teacher:build_datasets"
    """`module:function(options) -> (train_dataset, eval_dataset or None)`, map-style datasets of (input, target)."""
    optimizer: str = "dtrain.examples.teacher:build_optimizer"
    """`module:function(params, options) -> torch.optim.Optimizer`."""
    scheduler: str = "dtrain.examples.teacher:build_scheduler"
    """`module:function(optimizer, options) -> LR scheduler or None`; empty for none."""
    loss: str = "dtrain.examples.teacher:per_sample_loss"
    """`module:function(output, target) -> per-sample loss tensor` (no reduction)."""
    shard: str = ""
    """`module:function(model) -> list of submodules`, the blocks `dist.strategy = "fsdp"` shards one
    by one (each gathered only while it computes); empty: every top-level child with parameters."""
    options: dict[str, Any] = field(default_factory=dict)
    """Free-form hyperparameters handed to every builder; recorded in each snapshot."""


@dataclass(frozen=True)
class DataConfig:
    num_workers: int = 0
    """DataLoader worker processes reading each rank's shares; 0 reads them in the training process."""
    prefetch_factor: int = 2
    """Batches each worker reads ahead (only with `num_workers` > 0)."""
    pin_memory: bool | str = AUTO
    """Read batches into page-locked memory for faster copies to the GPU: `auto` (on with CUDA), true or false."""


@dataclass(frozen=True)
class DistConfig:
    strategy: str = "ddp"
    """`ddp`: every rank holds the whole model and optimizer; `fsdp`: each holds a shard of them
    (FSDP2's `fully_shard`), for models whose state does not fit on one device. Either can resume
    the other's snapshots, on any number of processes."""
    backend: str = AUTO
    """`auto` (nccl with CUDA, else gloo), `gloo` or `nccl`."""
    timeout_seconds: float = 120.0
    """Bound on every collective and on joining the process group, so a lost rank fails the group instead of hanging it."""


@dataclass(frozen=True)
class ReportConfig:
    tensorboard: bool = True
    """Rank 0 also writes every metrics row as TensorBoard scalars under `RUN_DIR/tb/`."""


@dataclass(frozen=True)
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read TOML at `path` (or start from defaults), apply `section.key=value` overrides, validate."""
    raw = _read_toml(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(_unknown("section", name, name, list(sections)))
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}]: expected a table of keys, got {values!r}; write it as `[{name}]` with keys under it")
        built[name] = _build_section(name, _section_type(name), values)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _section_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(_unknown("key", f"{section}.{key}", key, list(hints), section))
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(value, origin):
            return value
    expected = " or ".join(_type_name(k) for k in allowed)
    raise ConfigError(
        f"{name}: expected {expected}, got {value!r} ({type(value).__name__}); "
        f"fix the value in the config file or pass --set {name}=<{expected}>"
    )


_UnionType = type(int | str)


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind) or kind
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a table"}.get(
        origin, getattr(origin, "__name__", str(origin))
    )


def _unknown(what: str, full: str, key: str, known: list[str], section: str | None = None) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    prefix = f"{section}." if section else ""
    fix = f"did you mean `{prefix}{close[0]}`?" if close else f"known {what}s: {', '.join(prefix + k for k in known)}"
    return f"unknown config {what} `{full}`; {fix}"


def validate(cfg: Config) -> None:
    """Range checks that need more than a type; raises ConfigError naming the key and the fix."""
    t, s, d, data = cfg.train, cfg.snapshot, cfg.dist, cfg.data
    _require(t.steps >= 1, "train.steps", t.steps, "set it to the total number of optimizer steps (>= 1)")
    _require(t.seed >= 0, "train.seed", t.seed, "use a non-negative integer seed")
    _require(t.global_batch_size >= 1, "train.global_batch_size", t.global_batch_size, "use a positive batch size")
    _require(t.eval_every_steps >= 0, "train.eval_every_steps", t.eval_every_steps, "use 0 (with snapshots) or a positive N")
    _require(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "use a positive N")
    _require(t.device in (AUTO, "cpu", "cuda"), "train.device", t.device, "use auto, cpu or cuda")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", t.micro_batch_size,
             "use 0 (the whole share in one pass) or a positive number of samples")
    _require(t.precision in PRECISIONS, "train.precision", t.precision, f"use {', '.join(PRECISIONS)}")
    _require(0 <= t.grad_clip_norm < math.inf, "train.grad_clip_norm", t.grad_clip_norm,
             "use 0 (off) or a positive, finite norm")
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, "use 0 (read in the training process) or more")
    _require(data.prefetch_factor >= 1, "data.prefetch_factor", data.prefetch_factor, "use 1 or more batches per worker")
    _require(data.pin_memory in (AUTO, True, False), "data.pin_memory", data.pin_memory, "use auto, true or false")
    every = s.every_steps
    _require(every == AUTO or (isinstance(every, int) and every >= 0), "snapshot.every_steps", every,
             'use a step count >= 0 or "auto"')
    _require(0 <= s.every_seconds < math.inf, "snapshot.every_seconds", s.every_seconds, "use 0 (off) or a positive number")
    _require(s.keep_last >= 1, "snapshot.keep_last", s.keep_last, "keep at least 1 snapshot")
    _require(s.keep_best >= 0, "snapshot.keep_best", s.keep_best, "use 0 (off) or a positive K")
    _require(s.best_mode in ("min", "max"), "snapshot.best_mode", s.best_mode, "use min or max")
    _require(bool(s.best_metric), "snapshot.best_metric", s.best_metric, "name a metric such as val_loss")
    _require(s.keep_every >= 0, "snapshot.keep_every", s.keep_every, "use 0 (off) or a positive M")
    _require(s.max_consecutive_failures >= 1, "snapshot.max_consecutive_failures", s.max_consecutive_failures, "use 1 or more")
    _require(0 < s.timeout_seconds < math.inf, "snapshot.timeout_seconds", s.timeout_seconds, "use a positive, finite number of seconds")
    _require(s.file_mb >= 1, "snapshot.file_mb", s.file_mb, "use a positive size in MiB")
    _require(s.staging in (AUTO, "copy", "fork"), "snapshot.staging", s.staging, "use auto, copy or fork")
    _require(0 < s.mtbf_seconds < math.inf, "snapshot.mtbf_seconds", s.mtbf_seconds, "use a positive, finite number of seconds")
    _require(d.strategy in STRATEGIES, "dist.strategy", d.strategy, f"use {' or '.join(STRATEGIES)}")
    _require(not (d.strategy == "fsdp" and t.precision == "fp16"), "train.precision", t.precision,
             'fp16 needs a gradient scaler that sees whole gradients; use bf16 with dist.strategy = "fsdp"')
    _require(d.backend in (AUTO, "gloo", "nccl"), "dist.backend", d.backend, "use auto, gloo or nccl")
    _require(0 < d.timeout_seconds < math.inf, "dist.timeout_seconds", d.timeout_seconds, "use a positive, finite number of seconds")
    for key in ("model", "data", "optimizer", "loss"):
        _require_entry_point(f"task.{key}", getattr(cfg.task, key), optional=False)
    _require_entry_point("task.shard", cfg.task.shard, optional=True)
    _require_entry_point("task.scheduler", cfg.task.scheduler, optional=True)


def validate_for_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on how many processes run the job."""
    b = cfg.train.global_batch_size
    _require(b >= world_size, "train.global_batch_size", b,
             f"it must be at least the world size ({world_size}): raise it or start fewer processes")


def validate_staging_for_device(cfg: Config, device_type: str) -> None:
    """Checks that depend on the device (`cpu` or `cuda`) the run trains on."""
    s = cfg.snapshot.staging
    _require(not (s == "fork" and device_type == "cuda"), "snapshot.staging", s,
             "on a CUDA device a forked child cannot read GPU memory: use copy or auto")


# Keys that fix the data order (the seed, the dataset and its options) or the model, its optimizer
# and its loss. Changing one on resume repeats and skips samples or trains a different model from
# the restored state, so it is refused unless accepted. A key is defining if it equals one of these
# or starts with one of these plus a dot.
DEFINING_KEYS = ("train.seed", "task")


class ConfigChangeRefused(ConfigError):
    """A resume would change a defining key (see DEFINING_KEYS) of the run dir's snapshot."""


@dataclass(frozen=True)
class ConfigChange:
    key: str
    """Dotted key, e.g. `task.options.lr`."""
    old: Any
    """The value in the snapshot's config; None if it had no such key."""
    new: Any
    """The value now; None if today's config has no such key."""

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class ConfigChanges:
    defining: tuple[ConfigChange, ...]
    """Changes to the data order or the model: refused on resume unless accepted."""
    applied: tuple[ConfigChange, ...]
    """Every other change: applied on resume and worth a log line."""


def config_changes(saved: dict[str, Any], new: Config) -> ConfigChanges:
    """Compare a snapshot's `Config.to_dict()` with `new`, leaf by leaf, e.g. `task.options.lr`."""
    sections = {f.name for f in dataclasses.fields(Config)}
    old = _leaves({k: v for k, v in saved.items() if k in sections})  # unknown sections: ignored
    now, defaults = _leaves(new.to_dict()), _leaves(Config().to_dict())
    changes = []
    for key in [*now, *(k for k in old if k not in now)]:  # in config order
        # A snapshot from an older dtrain lacks keys added since, and ran as their default does.
        unchanged_default = key not in old and key in defaults and now.get(key) == defaults[key]
        if old.get(key) != now.get(key) and not unchanged_default:
            changes.append(ConfigChange(key, old.get(key), now.get(key)))
    defining = tuple(c for c in changes if _is_defining(c.key))
    return ConfigChanges(defining, tuple(c for c in changes if not _is_defining(c.key)))


def check_resume_config(saved: dict[str, Any], new: Config, allow_change: bool) -> ConfigChanges:
    """Refuse a resume that changes the data order or the model unless `allow_change`; else return the changes.

    Example::

        changes = check_resume_config(manifest["config"], cfg, args.allow_config_change)
    """
    changes = config_changes(saved, new)
    if changes.defining and not allow_change:
        listed = "; ".join(str(c) for c in changes.defining)
        raise ConfigChangeRefused(
            f"the run dir's snapshot was trained with a different data order or model: {listed}. "
            "Resuming would silently repeat and skip samples or train a different model; restore the old "
            "values, use a new --run-dir, or pass --allow-config-change to accept them"
        )
    return changes


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_leaves(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def _is_defining(key: str) -> bool:
    if key == "task.shard":  # how the model is cut over the ranks, not what it computes
        return False
    return any(key == d or key.startswith(f"{d}.") for d in DEFINING_KEYS)


def _require_entry_point(name: str, value: str, optional: bool) -> None:
    if optional and value == "":
        return
    module, _, function = value.partition(":")
    _require(bool(module) and bool(function) and " " not in value and not module.startswith("."), name, value,
             "write it as `package.module:function` (an absolute module path)")


def _require(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is invalid: {fix}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing TOML file to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax at that line") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); pass a readable TOML file to --config") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r} is malformed; write it as --set section.key=value, e.g. --set train.steps=500")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: `{part}` is not a table; check the key path")
    node[parts[-1]] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """A TOML literal (`3`, `0.5`, `true`, `"x"`, `[1, 2]`); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
