"""A real run with faults for the report, status and TensorBoard tests, built once per session.

Under one `torchrun --nproc_per_node 2 --max-restarts 2` of the demo task, a worker is SIGKILLed
twice, each time a few steps past a committed snapshot (so the killed attempt logged steps its
successor replays), then the agent gets SIGTERM (a preemption: both workers commit the current
step and exit 75). A second torchrun, with one worker, resumes it at world size 1 and finishes.
Just before the preemption, `dtrain status --json` and `dtrain report` read the live run
(`live-status.json`, `live-report.html` beside the run dir).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from dtrain.observe import timeline
from dtrain.snapshot import layout
from support.procs import kill, kill_tree, wait_for, workers
from tests.conftest import REPO, dtrain_cmd, run, torchrun_cmd

EVERY = 10
SETTINGS = ["train.steps=100000", "train.log_every_steps=1", f"snapshot.every_steps={EVERY}", "snapshot.keep_last=2",
            "task.options.hidden=256"]
EXTRA_STEPS = 12
"""The world-size-1 attempt trains this many steps past the preempted one."""


def build(run_dir: Path) -> Path:
    log = run_dir.parent / "torchrun.log"
    agent = _start(run_dir, 2, log, max_restarts=2, settings=SETTINGS)
    try:
        for attempt in (1, 2):
            _kill_a_worker_past_a_snapshot(agent, run_dir, attempt)
        wait_for(lambda: _in_attempt(run_dir, 3, committed=True), 180, "a snapshot committed by the third attempt")
        _observe_live(run_dir)
        agent.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes do to preempt
        agent.wait(timeout=120)
    finally:
        kill_tree(agent.pid)
    preempted = [r for r in _rows(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1, log.read_text()[-4000:]
    steps = preempted[0]["step"] + EXTRA_STEPS
    final = _start(run_dir, 1, run_dir.parent / "resume.log", max_restarts=0,
                   settings=[*SETTINGS, f"train.steps={steps}"])
    assert final.wait(timeout=180) == 0, (run_dir.parent / "resume.log").read_text()[-4000:]
    return run_dir


def _observe_live(run_dir: Path) -> None:
    status = run(dtrain_cmd("status", str(run_dir), "--json"), timeout=120)
    assert status.returncode == 0, status.stdout
    (run_dir.parent / "live-status.json").write_text(status.stdout)
    report = run(dtrain_cmd("report", str(run_dir), "--out", str(run_dir.parent / "live-report.html")), timeout=120)
    assert report.returncode == 0, report.stdout


def _start(run_dir: Path, nproc: int, log: Path, max_restarts: int, settings: list[str]) -> subprocess.Popen:
    sets = [arg for s in settings for arg in ("--set", s)]
    cmd = torchrun_cmd(nproc, "train", "--config", "examples/demo.toml", "--run-dir", str(run_dir), *sets,
                       max_restarts=max_restarts)
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_a_worker_past_a_snapshot(agent: subprocess.Popen, run_dir: Path, attempt: int) -> None:
    """SIGKILL a worker of `attempt` once it committed a snapshot and logged 3 to 7 steps past one."""
    wait_for(lambda: _in_attempt(run_dir, attempt, committed=True), 180, f"a snapshot committed by attempt {attempt}")
    wait_for(lambda: _in_attempt(run_dir, attempt, past=True), 60, f"attempt {attempt} 3 steps past a snapshot",
             interval=0.01)
    assert kill(workers(agent.pid)[-1], signal.SIGKILL)


def _in_attempt(run_dir: Path, attempt: int, committed: bool = False, past: bool = False) -> bool:
    """Whether attempt `attempt` (1-based; counted by start and resume events) has committed a
    snapshot (`committed`), or logged a step 3 to 7 past a multiple of EVERY (`past`)."""
    rows, starts = _rows(run_dir), 0
    mine = []
    for r in rows:
        starts += r.get("event") in timeline.START_EVENTS
        if starts == attempt:
            mine.append(r)
    if committed:
        return any(r.get("event") == "snapshot" and r.get("committed") for r in mine)
    trained = [r["step"] for r in mine if "train_loss" in r]
    return bool(trained) and 3 <= trained[-1] % EVERY <= 7


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / layout.METRICS
    return timeline.read_rows(path) if path.exists() else []


def shared_run(tmp_path_factory) -> Path:
    """The run, built once for the whole test session, also under pytest-xdist: the first worker
    to take the lock builds it in the session's shared temp dir, the others wait and reuse it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is inside the session's
        base = base.parent
    root = base / "report-fault-run"
    root.mkdir(exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            build(root / "run")
            (root / "built").touch()
    return root / "run"
