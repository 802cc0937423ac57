"""The real command line under torchrun: workers SIGKILLed, torchrun restarts them, the run ends the same."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dtrain.snapshot import layout
from support.procs import kill, kill_tree, wait_for, workers
from tests.conftest import REPO, dtrain_cmd, run, torchrun_cmd, uninterrupted_weights
from tests.conftest import export_weights as _export

SETTINGS = ["--set", "train.steps=60", "--set", "snapshot.every_steps=10", "--set", "task.options.hidden=768",
            "--set", "task.options.num_samples=2048", "--set", "train.log_every_steps=10"]


def _train_args(run_dir: Path) -> list[str]:
    return ["train", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *SETTINGS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return uninterrupted_weights(tmp_path_factory.mktemp("reference") / "run", *SETTINGS)


def _start(run_dir: Path) -> subprocess.Popen:
    """torchrun in the background, its output to a file (a pipe nobody reads would block the workers)."""
    run_dir.mkdir(parents=True)
    log = (run_dir.parent / "torchrun.log").open("w")
    return subprocess.Popen(torchrun_cmd(2, *_train_args(run_dir), max_restarts=2), cwd=REPO, text=True,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(agent: subprocess.Popen, run_dir: Path, timeout: float = 240) -> str:
    try:
        agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(agent.pid)
        agent.wait()
    out = (run_dir.parent / "torchrun.log").read_text()
    assert agent.returncode == 0, out[-4000:]
    return out


def _committed(run_dir: Path) -> list[str]:
    snaps = run_dir / layout.SNAPSHOTS
    return sorted(n for n in os.listdir(snaps) if n.startswith("step_")) if snaps.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_sigkill_during_training(tmp_path: Path, reference: bytes, seed: int) -> None:
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    agent = _start(run_dir)
    wait_for(lambda: _committed(run_dir), 120, "the first committed snapshot")
    victim = rng.choice(workers(agent.pid))

    time.sleep(rng.uniform(0.0, 0.5))
    assert kill(victim, signal.SIGKILL)
    out = _finish(agent, run_dir)
    assert "resumed from snapshot step" in out, out[-3000:]
    assert _export(run_dir) == reference


@pytest.mark.slow
def test_sigkill_during_a_snapshot_write(tmp_path: Path, reference: bytes) -> None:
    run_dir = tmp_path / "run"
    pending = run_dir / layout.PENDING
    agent = _start(run_dir)
    victims = workers(agent.pid)
    wait_for(lambda: _committed(run_dir), 120, "the first committed snapshot")
    in_flight = wait_for(lambda: pending.is_dir() and os.listdir(pending), 120, "a save in flight", interval=0.001)
    assert kill(victims[-1], signal.SIGKILL)
    out = _finish(agent, run_dir)
    assert in_flight and "resumed from snapshot step" in out
    assert _export(run_dir) == reference
    assert run(dtrain_cmd("ckpt", "verify", str(run_dir))).returncode == 0
