from __future__ import annotations

import os
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
