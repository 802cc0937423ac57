"""Config: TOML plus `--set` overrides, and every kind of bad input refused with a message that
names the key, the bad value and the fix, before the run dir is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtrain.config import (
    Config,
    ConfigChange,
    ConfigChangeRefused,
    TaskConfig,
    check_resume_config,
    config_changes,
    config_from_dict,
    load_config,
    validate_for_world,
    validate_staging_for_device,
)
from dtrain.errors import ConfigError
from dtrain.task import load_task
from tests.conftest import dtrain_cmd, run


def _config_file(tmp_path: Path, text: str | None) -> Path | None:
    if text is None:
        return None
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _config_error(tmp_path: Path, text: str | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_config_file(tmp_path, text), overrides)
    return str(info.value)


# -- valid input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, section, key, expected",
    [
        (["train.steps=500"], "train", "steps", 500),
        (["train.steps=1_000"], "train", "steps", 1000),
        ([" train.steps = 9 "], "train", "steps", 9),
        (["train.steps=1", "train.steps=7"], "train", "steps", 7),  # the last --set wins
        (["snapshot.at_epoch_end=true"], "snapshot", "at_epoch_end", True),
        (["snapshot.at_epoch_end=false"], "snapshot", "at_epoch_end", False),
        (["snapshot.every_seconds=30"], "snapshot", "every_seconds", 30.0),
        (["snapshot.timeout_seconds=2.5"], "snapshot", "timeout_seconds", 2.5),
        (["dist.timeout_seconds=1"], "dist", "timeout_seconds", 1.0),
        (["train.device=cpu"], "train", "device", "cpu"),  # a bare word is a string
        (['train.device="cuda"'], "train", "device", "cuda"),
        (['snapshot.every_steps="auto"'], "snapshot", "every_steps", "auto"),
        (["snapshot.every_steps=auto"], "snapshot", "every_steps", "auto"),
        (["snapshot.every_steps=0"], "snapshot", "every_steps", 0),
        (["snapshot.every_steps=25"], "snapshot", "every_steps", 25),
        (["snapshot.best_mode=max"], "snapshot", "best_mode", "max"),
        (['task.scheduler=""'], "task", "scheduler", ""),  # the one optional entry point
        (["task.model=tests.test_config:build_anything"], "task", "model", "tests.test_config:build_anything"),
        (["task.options.lr=0.1"], "task", "options", {"lr": 0.1}),
        (["task.options.name=a=b"], "task", "options", {"name": "a=b"}),
        (["task.options.layers=[1, 2]"], "task", "options", {"layers": [1, 2]}),
        (["task.options.lr=0.1", "task.options.depth=3"], "task", "options", {"lr": 0.1, "depth": 3}),
    ],
)
def test_valid_override(overrides: list[str], section: str, key: str, expected: Any) -> None:
    value = getattr(getattr(load_config(None, overrides), section), key)
    assert value == expected
    assert type(value) is type(expected)  # 30 given for a float field arrives as 30.0, a bool stays a bool


def test_no_file_and_no_override_gives_the_defaults() -> None:
    assert load_config(None, []) == Config()


def test_file_values_apply_and_overrides_win_over_them(tmp_path: Path) -> None:
    path = _config_file(tmp_path, '[train]\nsteps = 100\nseed = 4\n[snapshot]\nkeep_last = 5\nevery_seconds = 60\n'
                                  'every_steps = "auto"\n[task.options]\nwidth = 32\n')
    cfg = load_config(path, ["train.steps=500", "task.options.depth=2"])
    assert (cfg.train.steps, cfg.train.seed) == (500, 4)
    assert cfg.snapshot.keep_last == 5 and cfg.snapshot.every_steps == "auto"
    assert cfg.snapshot.every_seconds == 60.0 and isinstance(cfg.snapshot.every_seconds, float)
    assert cfg.task.options == {"width": 32, "depth": 2}
    assert cfg.train.global_batch_size == Config().train.global_batch_size  # untouched keys keep defaults


def test_to_dict_reloads_to_the_same_config() -> None:
    cfg = load_config(None, ["train.steps=11", "snapshot.every_steps=auto", "task.options.lr=0.5"])
    assert config_from_dict(cfg.to_dict()) == cfg


# -- bad input: each message names the key, the bad value and the fix ---------------------------


@pytest.mark.parametrize(
    "text, overrides, fragments",
    [
        # unknown names, with the closest known one as the fix
        (None, ["trian.steps=5"], ["unknown config section `trian`", "did you mean `train`?"]),
        (None, ["zzz.a=1"], ["unknown config section `zzz`", "known sections: train, snapshot, task, data, dist, report"]),
        (None, ["snapshot.keep_lst=2"], ["unknown config key `snapshot.keep_lst`", "did you mean `snapshot.keep_last`?"]),
        ("[snapshot]\nkeep_lst = 2\n", [], ["`snapshot.keep_lst`", "did you mean `snapshot.keep_last`?"]),
        (None, ["train.stpes=5"], ["`train.stpes`", "did you mean `train.steps`?"]),
        (None, ["train.qqqq=1"], ["unknown config key `train.qqqq`", "known keys: train.steps, train.global_batch_size"]),
        # wrong types
        (None, ['train.steps="abc"'], ["train.steps", "expected an integer", "'abc'", "--set train.steps=<an integer>"]),
        (None, ["train.steps=abc"], ["train.steps", "expected an integer", "'abc'", "(str)"]),
        ('[train]\nsteps = "abc"\n', [], ["train.steps", "expected an integer", "'abc'", "fix the value in the config file"]),
        (None, ["train.steps=true"], ["train.steps", "expected an integer", "True (bool)"]),
        (None, ["train.steps=2.5"], ["train.steps", "expected an integer", "2.5 (float)"]),
        (None, ["train.steps="], ["train.steps", "expected an integer", "'' (str)"]),
        (None, ["snapshot.every_seconds=true"], ["snapshot.every_seconds", "expected a number", "True (bool)"]),
        (None, ["snapshot.every_seconds=soon"], ["snapshot.every_seconds", "expected a number", "'soon'"]),
        (None, ["snapshot.at_epoch_end=1"], ["snapshot.at_epoch_end", "expected true/false", "1 (int)"]),
        (None, ["snapshot.at_epoch_end=yes"], ["snapshot.at_epoch_end", "expected true/false", "'yes'"]),
        (None, ["snapshot.every_steps=true"], ["snapshot.every_steps", "expected an integer or a string", "True (bool)"]),
        (None, ["snapshot.every_steps=1.5"], ["snapshot.every_steps", "expected an integer or a string", "1.5"]),
        (None, ["train.device=1"], ["train.device", "expected a string", "1 (int)"]),
        (None, ["task.options=5"], ["task.options", "expected a table", "5 (int)"]),
        ("train = 5\n", [], ["[train]: expected a table of keys, got 5", "write it as `[train]`"]),
        ("[train]\nsteps = 5\n", ["train.steps.x=1"], ["`steps` is not a table", "train.steps.x=1"]),
        # out of range
        (None, ["train.steps=0"], ["train.steps = 0 is invalid", ">= 1"]),
        (None, ["train.steps=-5"], ["train.steps = -5 is invalid", ">= 1"]),
        (None, ["train.global_batch_size=0"], ["train.global_batch_size = 0 is invalid", "positive batch size"]),
        (None, ["train.eval_every_steps=-1"], ["train.eval_every_steps = -1 is invalid", "positive N"]),
        (None, ["train.log_every_steps=0"], ["train.log_every_steps = 0 is invalid", "positive N"]),
        (None, ["train.device=tpu"], ["train.device = 'tpu' is invalid", "use auto, cpu or cuda"]),
        (None, ["snapshot.every_steps=-1"], ["snapshot.every_steps = -1 is invalid", '"auto"']),
        (None, ["snapshot.every_steps=sometimes"], ["snapshot.every_steps = 'sometimes' is invalid", '"auto"']),
        (None, ["snapshot.every_seconds=-1"], ["snapshot.every_seconds = -1.0 is invalid", "0 (off)"]),
        (None, ["snapshot.every_seconds=nan"], ["snapshot.every_seconds = nan is invalid", "0 (off)"]),
        (None, ["snapshot.keep_last=0"], ["snapshot.keep_last = 0 is invalid", "keep at least 1"]),
        (None, ["snapshot.keep_best=-1"], ["snapshot.keep_best = -1 is invalid", "0 (off)"]),
        (None, ["snapshot.best_mode=median"], ["snapshot.best_mode = 'median' is invalid", "use min or max"]),
        (None, ['snapshot.best_metric=""'], ["snapshot.best_metric = '' is invalid", "val_loss"]),
        (None, ["snapshot.keep_every=-2"], ["snapshot.keep_every = -2 is invalid", "positive M"]),
        (None, ["snapshot.max_consecutive_failures=0"], ["snapshot.max_consecutive_failures = 0 is invalid", "1 or more"]),
        (None, ["snapshot.timeout_seconds=0"], ["snapshot.timeout_seconds = 0.0 is invalid", "positive, finite number of seconds"]),
        (None, ["snapshot.file_mb=0"], ["snapshot.file_mb = 0 is invalid", "positive size in MiB"]),
        (None, ["snapshot.staging=disk"], ["snapshot.staging = 'disk' is invalid", "auto, copy or fork"]),
        (None, ["snapshot.mtbf_seconds=0"], ["snapshot.mtbf_seconds = 0.0 is invalid", "positive, finite number of seconds"]),
        (None, ["dist.backend=mpi"], ["dist.backend = 'mpi' is invalid", "auto, gloo or nccl"]),
        (None, ["dist.timeout_seconds=-1"], ["dist.timeout_seconds = -1.0 is invalid", "positive, finite number of seconds"]),
        # entry points that are not `module:function`
        (None, ["task.model=nocolon"], ["task.model = 'nocolon' is invalid", "`package.module:function`"]),
        (None, ['task.model=""'], ["task.model = '' is invalid", "`package.module:function`"]),
        (None, ["task.loss=mod:"], ["task.loss = 'mod:' is invalid", "`package.module:function`"]),
        (None, ["task.data=:build"], ["task.data = ':build' is invalid", "`package.module:function`"]),
        (None, ['task.optimizer="my mod:build"'], ["task.optimizer = 'my mod:build' is invalid", "`package.module:function`"]),
        (None, ["task.scheduler=nocolon"], ["task.scheduler = 'nocolon' is invalid", "`package.module:function`"]),
        # malformed --set
        (None, ["train.steps"], ["--set 'train.steps' is malformed", "--set section.key=value"]),
        (None, ["steps=5"], ["--set 'steps=5' is malformed", "--set section.key=value"]),
        (None, ["train..steps=5"], ["--set 'train..steps=5' is malformed", "e.g. --set train.steps=500"]),
        (None, [".steps=5"], ["--set '.steps=5' is malformed"]),
        (None, ["train.=5"], ["--set 'train.=5' is malformed"]),
        (None, ["=5"], ["--set '=5' is malformed"]),
        # a bad file
        ("[train\nsteps = 1\n", [], ["is not valid TOML", "line 1", "fix the syntax"]),
        ("[train]\nsteps = = 1\n", [], ["is not valid TOML", "line 2", "fix the syntax"]),
        ("[train]\nsteps = 1\nsteps = 2\n", [], ["is not valid TOML", "fix the syntax"]),
    ],
)
def test_bad_input_is_refused_naming_the_key_value_and_fix(tmp_path: Path, text: str | None, overrides: list[str],
                                                          fragments: list[str]) -> None:
    message = _config_error(tmp_path, text, overrides)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_config_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, [])
    assert str(missing) in str(info.value) and "--config" in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = _config_error(tmp_path, "[train]\nsteps = \n", [])
    assert str(tmp_path / "config.toml") in message


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_config_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes(b"[train]\nsteps = 5 # caf\xe9\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, [])


def test_negative_seed_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.seed"):
        load_config(None, ["train.seed=-1"])


@pytest.mark.parametrize("key", ["snapshot.timeout_seconds", "dist.timeout_seconds", "snapshot.mtbf_seconds"])
def test_infinite_seconds_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}=inf"])


@pytest.mark.parametrize(
    "batch, world, ok",
    [(64, 1, True), (4, 4, True), (5, 4, True), (2, 4, False), (3, 4, False), (1, 2, False), (1, 1, True)],
)
def test_validate_for_world(batch: int, world: int, ok: bool) -> None:
    cfg = load_config(None, [f"train.global_batch_size={batch}"])
    if ok:
        validate_for_world(cfg, world)
        return
    with pytest.raises(ConfigError) as info:
        validate_for_world(cfg, world)
    message = str(info.value)
    assert f"train.global_batch_size = {batch} is invalid" in message
    assert f"at least the world size ({world})" in message and "start fewer processes" in message


# -- entry points, resolved by dtrain.task.load_task ------------------------------------------

NOT_CALLABLE = 42


def build_anything(options: dict[str, Any]) -> None:
    return None


def test_load_task_resolves_every_entry_point() -> None:
    task = load_task(TaskConfig(model="tests.test_config:build_anything", options={"width": 3}))
    assert task.build_model is build_anything
    assert all(callable(f) for f in (task.build_data, task.build_optimizer, task.build_scheduler, task.per_sample_loss))
    assert task.options == {"width": 3}


def test_empty_scheduler_means_none() -> None:
    assert load_task(TaskConfig(scheduler="")).build_scheduler is None


@pytest.mark.parametrize("field", ["model", "data", "optimizer", "scheduler", "loss"])
@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("tests.test_config:no_such_function", ["has no function 'no_such_function'", "fix the name after the colon"]),
        ("tests.test_config:NOT_CALLABLE", ["has no function 'NOT_CALLABLE'", "fix the name after the colon"]),
        ("tests.test_config", ["has no function ''", "fix the name after the colon"]),  # no colon
        ("nosuchmodule_dtrain:build", ["cannot import module 'nosuchmodule_dtrain'", "fix the module path"]),
        ("dtrain.nosuchmodule:build", ["cannot import module 'dtrain.nosuchmodule'", "fix the module path"]),
    ],
)
def test_bad_entry_point_names_the_key_and_the_fix(field: str, spec: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig(**{field: spec}))
    message = str(info.value)
    assert message.startswith(f"task.{field} = {spec!r}")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_relative_module_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="task.model"):
        load_task(TaskConfig(model=".teacher:build_model"))


# -- the real CLI: exit code 2, a message naming the key and the fix, the run dir untouched -------


@pytest.mark.parametrize(
    "text, sets, env, fragments",
    [
        ("[snapshot]\nkeep_lst = 2\n", [], {},
         ["unknown config key `snapshot.keep_lst`", "did you mean `snapshot.keep_last`?"]),
        ('[train]\nsteps = "abc"\n', [], {},
         ["train.steps", "'abc'", "--set train.steps=<an integer>"]),
        ("[train]\nglobal_batch_size = 2\n", [], {"WORLD_SIZE": "4"},
         ["train.global_batch_size = 2 is invalid", "world size (4)", "start fewer processes"]),
        ('[task]\nmodel = "nosuchmodule:build"\n', [], {},
         ["task.model = 'nosuchmodule:build'", "cannot import module 'nosuchmodule'", "fix the module path"]),
        (None, ["train.steps"], {},
         ["--set 'train.steps' is malformed", "--set section.key=value"]),
        ("[train\n", [], {},
         ["is not valid TOML", "fix the syntax"]),
    ],
    ids=["unknown-key", "wrong-type", "batch-below-world", "missing-module", "malformed-set", "invalid-toml"],
)
def test_cli_refuses_bad_config_before_touching_the_run_dir(tmp_path: Path, text: str | None, sets: list[str],
                                                            env: dict[str, str], fragments: list[str]) -> None:
    run_dir = tmp_path / "runs" / "demo"
    args = ["train", "--run-dir", str(run_dir)]
    path = _config_file(tmp_path, text)
    if path is not None:
        args += ["--config", str(path)]
    for item in sets:
        args += ["--set", item]
    result = run(dtrain_cmd(*args), timeout=120, env=env)
    assert result.returncode == 2, result.stdout
    assert "dtrain: config error:" in result.stdout
    assert "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in result.stdout, f"{fragment!r} not in {result.stdout!r}"
    assert not (tmp_path / "runs").exists()


# -- resume: a saved config compared with the new one --------------------------------------------


def _saved(*overrides: str) -> dict[str, Any]:
    return load_config(None, list(overrides)).to_dict()


@pytest.mark.parametrize(
    "saved, overrides, expected",
    [
        ([], [], []),
        (["task.options.lr=0.01", "task.options.net={width=8}"], ["task.options.lr=0.01", "task.options.net={width=8}"], []),
        ([], ["train.seed=1"], [("train.seed", 0, 1)]),
        (["task.options.lr=0.01"], ["task.options.lr=0.03"], [("task.options.lr", 0.01, 0.03)]),
        (["task.options.lr=0.01"], [], [("task.options.lr", 0.01, None)]),
        ([], ["task.options.net={width=8}"], [("task.options.net.width", None, 8)]),
        (["task.options.net={width=8, depth=2}"], ["task.options.net={width=8}"], [("task.options.net.depth", 2, None)]),
        (["task.options.net={width=8}"], ["task.options.net={width=16}"], [("task.options.net.width", 8, 16)]),
        ([], ["task.model=tests.test_config:build_anything"],
         [("task.model", "dtrain.examples.teacher:build_model", "tests.test_config:build_anything")]),
        ([], ['task.scheduler=""'], [("task.scheduler", "dtrain.examples.teacher:build_scheduler", "")]),
        (["task.options.lr=0.01"], ["train.seed=1", "task.options.lr=0.03"],
         [("train.seed", 0, 1), ("task.options.lr", 0.01, 0.03)]),
    ],
)
def test_defining_change_is_refused_naming_each_key(saved: list[str], overrides: list[str],
                                                    expected: list[tuple[str, Any, Any]]) -> None:
    new = load_config(None, overrides)
    changes = config_changes(_saved(*saved), new)
    assert [(c.key, c.old, c.new) for c in changes.defining] == expected
    assert changes.applied == ()
    if not expected:
        assert check_resume_config(_saved(*saved), new, allow_change=False) == changes
        return
    with pytest.raises(ConfigChangeRefused) as info:
        check_resume_config(_saved(*saved), new, allow_change=False)
    message = str(info.value)
    assert "--allow-config-change" in message and "--run-dir" in message
    for key, old, value in expected:
        assert f"{key}: {old!r} -> {value!r}" in message, message


def test_refusal_message_reads_old_then_new() -> None:
    with pytest.raises(ConfigChangeRefused, match=r"train\.seed: 0 -> 1") as info:
        check_resume_config(_saved(), load_config(None, ["train.seed=1"]), allow_change=False)
    assert "different data order or model" in str(info.value)


def test_allowed_defining_change_is_returned_not_raised() -> None:
    changes = check_resume_config(_saved(), load_config(None, ["train.seed=1", "train.steps=500"]), allow_change=True)
    assert changes.defining == (ConfigChange("train.seed", 0, 1),)
    assert changes.applied == (ConfigChange("train.steps", 200, 500),)


@pytest.mark.parametrize(
    "override, key, old, new",
    [
        ("train.steps=500", "train.steps", 200, 500),
        ("train.global_batch_size=32", "train.global_batch_size", 64, 32),
        ("train.log_every_steps=1", "train.log_every_steps", 10, 1),
        ("train.device=cpu", "train.device", "auto", "cpu"),
        ("snapshot.keep_last=5", "snapshot.keep_last", 3, 5),
        ("snapshot.every_steps=auto", "snapshot.every_steps", 50, "auto"),
        ("dist.timeout_seconds=30", "dist.timeout_seconds", 120.0, 30.0),
    ],
)
def test_other_changes_are_applied_and_reported(override: str, key: str, old: Any, new: Any) -> None:
    changes = check_resume_config(_saved(), load_config(None, [override]), allow_change=False)
    assert changes.defining == ()
    assert changes.applied == (ConfigChange(key, old, new),)
    assert str(changes.applied[0]) == f"{key}: {old!r} -> {new!r}"


def _without(tree: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    return {**tree, section: {k: v for k, v in tree[section].items() if k != key}}


@pytest.mark.parametrize(
    "saved, overrides, defining, applied",
    [
        # a snapshot from an older dtrain: a key it lacks ran as today's default
        (_without(_saved(), "snapshot", "mtbf_seconds"), [], [], []),
        (_without(_saved(), "task", "scheduler"), [], [], []),
        ({k: v for k, v in _saved().items() if k != "dist"}, [], [], []),
        # ... but a value other than the default is still a change
        (_without(_saved(), "snapshot", "mtbf_seconds"), ["snapshot.mtbf_seconds=60"], [],
         [("snapshot.mtbf_seconds", None, 60.0)]),
        (_without(_saved(), "task", "loss"), ["task.loss=tests.test_config:build_anything"],
         [("task.loss", None, "tests.test_config:build_anything")], []),
        # sections today's Config does not know are ignored; unknown keys of a known one are not
        ({**_saved(), "profiler": {"enabled": True}}, [], [], []),
        ({**_saved(), "train": {**_saved()["train"], "warmup": 5}}, [], [], [("train.warmup", 5, None)]),
    ],
    ids=["missing-key-default", "missing-task-key-default", "missing-section-default", "missing-key-changed",
         "missing-task-key-changed", "unknown-section", "removed-key"],
)
def test_snapshot_from_another_version(saved: dict[str, Any], overrides: list[str],
                                       defining: list[tuple[str, Any, Any]], applied: list[tuple[str, Any, Any]]) -> None:
    changes = config_changes(saved, load_config(None, overrides))
    assert [(c.key, c.old, c.new) for c in changes.defining] == defining
    assert [(c.key, c.old, c.new) for c in changes.applied] == applied


def test_config_change_refused_is_a_config_error() -> None:
    assert issubclass(ConfigChangeRefused, ConfigError)


@pytest.mark.parametrize(
    "staging, device, ok",
    [("fork", "cuda", False), ("fork", "cpu", True), ("copy", "cuda", True), ("auto", "cuda", True), ("copy", "cpu", True)],
)
def test_fork_staging_is_refused_on_cuda(staging: str, device: str, ok: bool) -> None:
    cfg = load_config(None, [f"snapshot.staging={staging}"])
    if ok:
        validate_staging_for_device(cfg, device)
        return
    with pytest.raises(ConfigError) as info:
        validate_staging_for_device(cfg, device)
    message = str(info.value)
    assert "snapshot.staging = 'fork'" in message
    assert "a forked child cannot read GPU memory: use copy or auto" in message
