"""`dtrain status RUN_DIR [--json]`: step, newest snapshot and its age, a save in flight, the last event, world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.observe import timeline
from dtrain.observe.sources import read_run_dir
from dtrain.observe.status import one_line, status
from dtrain.runlock import LOCK_NAME
from dtrain.snapshot import catalog, layout
from dtrain.storage import LocalStorage
from tests import report_run
from tests.conftest import dtrain_cmd, run
from tests.test_report_timeline import RUN


def _run_dir(tmp_path: Path, rows: list[dict], holder_pid: int, pending: list[str] = ()) -> Path:
    """A run dir with `rows` (times shifted to end now), a lock line naming `holder_pid`, and `.pending/` entries."""
    shift = time.time() - rows[-1]["time"]
    (tmp_path / layout.METRICS).write_text("".join(json.dumps({**r, "time": r["time"] + shift}) + "\n" for r in rows))
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder_pid, "since_unix": 0}))
    for name in pending:
        (tmp_path / layout.PENDING / name).mkdir(parents=True)
    return tmp_path


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_run_saving_a_snapshot(tmp_path: Path) -> None:
    """Rows up to step 7 of the second attempt (world size 1); this process stands in for the live rank 0."""
    rows = RUN[:13]
    run_dir = _run_dir(tmp_path, rows, holder_pid=os.getpid(),
                       pending=[f"{layout.step_dir_name(10)}.abc123", "deleting-step_000000004.xyz"])
    s = status(read_run_dir(run_dir))
    assert (s["state"], s["step"], s["world_size"], s["attempts"]) == ("running", 8, 1, 2)
    assert [p["step"] for p in s["saving"]] == [10] and s["abandoned_saves"] == []
    assert s["last_event"]["event"] == "resume" and s["last_event"]["step"] == 5
    assert s["snapshot"] is None
    line = one_line(s)
    assert "running, step 8 at world size 1" in line and "saving step 10" in line
    assert "no committed snapshot" in line and "last event: resume from step 5" in line


def test_a_killed_run_leaves_an_abandoned_save(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, RUN[:9], holder_pid=_dead_pid(), pending=[f"{layout.step_dir_name(10)}.abc123"])
    s = status(read_run_dir(run_dir))
    assert (s["state"], s["saving"], s["abandoned_saves"]) == ("stopped", [], [10])
    assert "abandoned save(s) of step 10" in one_line(s)


def test_not_a_run_dir(tmp_path: Path) -> None:
    done = run(dtrain_cmd("status", str(tmp_path / "nope")))
    assert done.returncode == 1
    assert f"{tmp_path / 'nope'}: not a run dir" in done.stdout and "--run-dir of a training run" in done.stdout


@pytest.mark.slow
def test_status_of_the_faulty_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    run_dir = report_run.shared_run(tmp_path_factory)
    rows = timeline.read_rows(run_dir / layout.METRICS)
    done = run(dtrain_cmd("status", str(run_dir), "--json"))
    assert done.returncode == 0, done.stdout
    s = json.loads(done.stdout)
    newest = catalog.committed_steps(LocalStorage(run_dir))[-1]
    last_train = [r for r in rows if "train_loss" in r][-1]
    assert (s["state"], s["step"], s["total_steps"], s["world_size"]) == ("finished", last_train["step"], newest, 1)
    assert s["snapshot"]["step"] == newest and s["snapshot"]["world_size"] == 1 and s["snapshot"]["age_s"] >= 0
    assert s["last_event"]["event"] == "resume" and s["attempts"] == 4 and s["saving"] == []
    line = run(dtrain_cmd("status", str(run_dir))).stdout.strip()
    assert line.startswith(f"{run_dir}: finished, step {newest} of {newest} at world size 1")


@pytest.mark.slow
def test_status_of_the_faulty_run_while_it_ran(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Read during its third attempt (world size 2, resumed after two SIGKILLs), before the preemption."""
    run_dir = report_run.shared_run(tmp_path_factory)
    s = json.loads((run_dir.parent / "live-status.json").read_text())
    resumes = [r for r in timeline.read_rows(run_dir / layout.METRICS) if r.get("event") == "resume"]
    assert (s["state"], s["world_size"], s["attempts"]) == ("running", 2, 3)
    assert s["lock_holder"]["alive"] is True and s["abandoned_saves"] == []
    assert s["last_event"]["event"] == "resume" and s["last_event"]["step"] == resumes[1]["step"]
    assert s["step"] > resumes[1]["step"] and s["snapshot"]["step"] > resumes[1]["step"]
    assert s["last_record_age_s"] < 30
