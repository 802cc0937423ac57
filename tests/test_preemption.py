"""Preemption and hangs under real torchrun: SIGTERM to the agent, SIGUSR1 to one worker, SIGSTOP a rank."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from dtrain.signals import EXIT_PREEMPTED
from dtrain.snapshot import catalog, layout, reader
from dtrain.storage import LocalStorage
from support.procs import kill, kill_tree, wait_for, workers
from tests.conftest import REPO, torchrun_cmd

ARGS = ["--set", "train.steps=100000", "--set", "snapshot.every_steps=50", "--set", "task.options.hidden=256"]
PREEMPTED = re.compile(r"preempted at step (\d+)")
RESUMED = re.compile(r"resumed from snapshot step (\d+)")


def _start(run_dir: Path, log: Path, max_restarts: int, extra: list[str] = ()) -> subprocess.Popen:
    cmd = torchrun_cmd(2, "train", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *ARGS, *extra,
                       max_restarts=max_restarts)
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(agent: subprocess.Popen, timeout: float) -> int:
    try:
        return agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(agent.pid)
        agent.wait()
        raise AssertionError("torchrun did not exit in time") from None


def _last_step(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / layout.METRICS).read_text().splitlines()]
    return max(r["step"] for r in rows if "train_loss" in r)


def _preempted_events(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / layout.METRICS).read_text().splitlines()]
    return [r for r in rows if r.get("event") == "preempted"]


def _training(run_dir: Path) -> bool:
    return (run_dir / layout.METRICS).exists() and (run_dir / layout.METRICS).stat().st_size > 0


@pytest.mark.slow
def test_sigterm_to_the_agent_commits_the_current_step_and_resume_loses_none(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "agent.log"
    agent = _start(run_dir, log, max_restarts=0, extra=["--set", "train.log_every_steps=1"])
    try:
        wait_for(lambda: _training(run_dir), 120, "training to start")
        agent.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes do
        _wait(agent, 90)
    finally:
        kill_tree(agent.pid)
    step = int(PREEMPTED.search(log.read_text()).group(1))
    storage = LocalStorage(run_dir)
    assert catalog.committed_steps(storage)[-1] == step
    assert reader.verify(storage, step) == []
    assert _last_step(run_dir) == step  # the emergency snapshot is of the last step trained: none lost
    [event] = _preempted_events(run_dir)  # what an operator reads in metrics.jsonl
    assert (event["step"], event["signal"], event["snapshot"]) == (step, "SIGTERM", layout.committed_path(step))
    assert event["signaled_ranks"] and set(event["signaled_ranks"]) <= {0, 1}  # torchrun passes it on to both

    resume_log = tmp_path / "resume.log"
    again = _start(run_dir, resume_log, max_restarts=0, extra=["--set", f"train.steps={step + 5}"])
    assert _wait(again, 120) == 0, resume_log.read_text()[-3000:]
    assert int(RESUMED.search(resume_log.read_text()).group(1)) == step


@pytest.mark.slow
def test_sigusr1_to_one_worker_stops_all_ranks_at_one_step_and_torchrun_resumes(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "agent.log"
    agent = _start(run_dir, log, max_restarts=1, extra=["--set", "train.steps=400"])
    try:
        wait_for(lambda: _training(run_dir), 120, "training to start")
        assert kill(workers(agent.pid)[-1], signal.SIGUSR1)
        assert _wait(agent, 240) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(agent.pid)
    text = log.read_text()
    stopped = {int(s) for s in PREEMPTED.findall(text)}
    assert len(stopped) == 1, f"ranks stopped at different steps: {stopped}"  # each rank logs its own warning
    step = stopped.pop()
    assert int(RESUMED.search(text).group(1)) == step
    [event] = _preempted_events(run_dir)
    assert (event["step"], event["signal"], len(event["signaled_ranks"])) == (step, "SIGUSR1", 1)
    assert f"exitcode: {EXIT_PREEMPTED}" in text  # torchrun saw the documented preemption exit code


@pytest.mark.slow
def test_a_stopped_rank_fails_the_group_within_the_timeout_and_torchrun_restarts_it(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "agent.log"
    agent = _start(run_dir, log, max_restarts=1,
                   extra=["--set", "train.steps=300", "--set", "dist.timeout_seconds=20"])
    try:
        wait_for(lambda: catalog.committed_steps(LocalStorage(run_dir)) if (run_dir / "snapshots").is_dir() else [],
                 120, "a committed snapshot")
        assert kill(workers(agent.pid)[0], signal.SIGSTOP)  # a rank that hangs without dying
        assert _wait(agent, 240) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(agent.pid)
    assert RESUMED.search(log.read_text())
    assert catalog.committed_steps(LocalStorage(run_dir))[-1] == 300
