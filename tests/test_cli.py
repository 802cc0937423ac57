"""`dtrain train --check`: the preflight a launcher runs before torchrun. It checks the config, the
task's entry points and the run dir, exits 0 or 2, and starts and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dtrain.cli import check_run_dir
from dtrain.errors import ConfigError
from tests.conftest import dtrain_cmd, run


def _check(run_dir: Path, *args: str, **kw) -> tuple[int, str]:
    done = run(dtrain_cmd("train", "--check", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *args),
               timeout=120, **kw)
    return done.returncode, done.stdout


def test_check_passes_a_good_config_and_writes_nothing(tmp_path: Path) -> None:
    code, out = _check(tmp_path / "runs" / "demo", "--set", "train.steps=10")
    assert code == 0, out
    assert "ready" in out
    assert not (tmp_path / "runs").exists()  # not even the run dir: a preflight leaves no trace


def test_check_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    code, out = _check(tmp_path / "run", "--set", "train.steps=0")
    assert code == 2, out
    assert "dtrain: config error: train.steps = 0 is invalid" in out and "(>= 1)" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_check_uses_the_world_size_it_is_given(tmp_path: Path) -> None:
    code, out = _check(tmp_path / "run", "--set", "train.global_batch_size=4", env={"WORLD_SIZE": "8"})
    assert code == 2, out
    assert "world size (8)" in out


def test_check_refuses_a_run_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    code, out = _check(tmp_path / "run")
    assert code == 2, out
    assert f"{tmp_path / 'run'} is not a directory" in out and "pass a --run-dir" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory; the check below covers it")
def test_check_refuses_a_run_dir_this_user_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        code, out = _check(locked / "run")
    finally:
        locked.chmod(0o755)
    assert code == 2, out
    assert f"{locked} is not writable by uid {os.getuid()}" in out and "fix its owner or permissions" in out


# -- the run dir check itself, in process --------------------------------------------------------

@pytest.mark.parametrize(("dirs", "files", "problem"), [
    ([], [], None),                                                    # a new run dir under a writable parent
    (["parent/run/snapshots/.pending"], ["parent/run/metrics.jsonl"], None),  # an existing run
    ([], ["parent"], "parent is not a directory"),                     # it would be made under a file
    (["parent"], ["parent/run"], "run is not a directory"),
    (["parent/run"], ["parent/run/snapshots"], "snapshots is not a directory"),
    (["parent/run/snapshots"], ["parent/run/snapshots/.pending"], ".pending is not a directory"),
], ids=["new", "existing", "under-a-file", "run-dir-a-file", "snapshots-a-file", "pending-a-file"])
def test_check_run_dir(tmp_path: Path, dirs: list[str], files: list[str], problem: str | None) -> None:
    for d in dirs:
        (tmp_path / d).mkdir(parents=True)
    for f in files:
        (tmp_path / f).write_text("")
    before = sorted(tmp_path.rglob("*"))
    if problem is None:
        check_run_dir(tmp_path / "parent" / "run")
    else:
        with pytest.raises(ConfigError, match=problem):
            check_run_dir(tmp_path / "parent" / "run")
    assert sorted(tmp_path.rglob("*")) == before  # the check writes nothing


def test_unwritable_run_dir_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount or another owner looks like to the check, even to root."""
    run_dir = tmp_path / "run"
    (run_dir / "snapshots").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "snapshots" and real_access(path, mode))
    with pytest.raises(ConfigError, match=r"snapshots is not writable by uid \d+ \(or is on a read-only file system\)"):
        check_run_dir(run_dir)
