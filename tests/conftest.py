from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from support.procs import REPO, dtrain_cmd, torchrun_cmd  # noqa: F401  (the tests' own names for them)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-trials", type=int, default=12, help="kill-and-restart trials in the crash harness")


@pytest.fixture
def chaos_trials(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--chaos-trials")


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run a command to completion with an outer timeout; the whole process group dies on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=kw.pop("cwd", REPO), start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def export_weights(run_dir: Path) -> bytes:
    """The bytes of `dtrain ckpt export` of a run dir's newest snapshot."""
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    done = run(dtrain_cmd("ckpt", "export", str(run_dir), "--out", str(out)))
    assert done.returncode == 0, done.stdout
    return out.read_bytes()


def uninterrupted_weights(run_dir: Path, *settings: str) -> bytes:
    """Exported weights of a fault-free 2-process torchrun of the demo config with `settings`."""
    done = run(torchrun_cmd(2, "train", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *settings))
    assert done.returncode == 0, done.stdout[-3000:]
    return export_weights(run_dir)


def sigkill_one_worker_mid_run(cmd: list[str], run_dir: Path, last_kill_step: int, rng: random.Random,
                               env: dict[str, str] | None = None) -> str:
    """Run `cmd` (a 2-process torchrun allowing a restart, training into `run_dir`), SIGKILL one
    worker chosen by `rng` at a step chosen by `rng` between the first commit and `last_kill_step`,
    and return torchrun's output once it exits 0 (asserting it does, naming the kill)."""
    from chaos.launch import committed_steps, last_step, read_metrics
    from support.procs import kill, kill_tree, wait_for, worker_ranks

    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.torchrun.log"
    with log.open("w") as out:
        agent = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"})
    try:
        ranks = worker_ranks(agent.pid, 2)
        first = wait_for(lambda: committed_steps(run_dir), 180, "the first committed snapshot")[0]
        at, victim = rng.randint(first + 1, last_kill_step), rng.randrange(2)
        wait_for(lambda: (last_step(read_metrics(run_dir)) or 0) >= at or agent.poll() is not None, 180,
                 f"step {at}", interval=0.005)
        assert agent.poll() is None, "the run ended before the kill"
        assert kill(ranks[victim], signal.SIGKILL)
        code = agent.wait(timeout=300)
    finally:
        kill_tree(agent.pid)
    out = log.read_text()
    assert code == 0, f"torchrun exited {code} after rank {victim} was SIGKILLed at step {at}:\n{out[-4000:]}"
    return out
