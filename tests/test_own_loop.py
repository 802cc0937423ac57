"""A training loop of the user's own, on the public API alone: the README's example, extracted from
the README and run under real torchrun, killed, preempted and resumed on other world sizes."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dtrain.snapshot import catalog, layout
from dtrain.storage import LocalStorage
from tests.conftest import REPO, export_weights, run
from tests.procs import kill, kill_tree, wait_for, worker_ranks

STEPS = 60
SEED = 20261129


def own_loop(tmp_path: Path) -> Path:
    """The README's example program, written to a file exactly as the README shows it."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "dtrain.trainer" not in code and "import dtrain" in code
    path = tmp_path / "own_loop.py"
    path.write_text(code)
    return path


def torchrun(nproc: int, script: Path, run_dir: Path, steps: int, max_restarts: int = 0) -> list[str]:
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", str(script), str(run_dir), str(steps)]


def _committed(run_dir: Path) -> list[int]:
    return catalog.committed_steps(LocalStorage(run_dir)) if (run_dir / layout.SNAPSHOTS).is_dir() else []


def _events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / layout.METRICS).read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The example run uninterrupted at 2 ranks: its program and exported weights."""
    tmp = tmp_path_factory.mktemp("own")
    script = own_loop(tmp)
    done = run(torchrun(2, script, tmp / "run", STEPS), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    return script, export_weights(tmp / "run")


def test_the_readme_loop_killed_and_restarted_by_torchrun_is_bit_identical(reference, tmp_path: Path) -> None:
    script, expected = reference
    run_dir = tmp_path / "run"
    agent = subprocess.Popen(torchrun(2, script, run_dir, STEPS, max_restarts=1), cwd=REPO,
                             stdout=(tmp_path / "log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _committed(run_dir), 180, "the first commit")
        rng = random.Random(SEED)
        victim = worker_ranks(agent.pid, 2)[rng.randrange(2)]
        assert kill(victim, signal.SIGKILL)
        assert agent.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        kill_tree(agent.pid)
    assert _events(run_dir, "resume"), "the restarted group did not resume"
    assert export_weights(run_dir) == expected


def test_the_readme_loop_resumed_2_3_1_matches_the_uninterrupted_run(reference, tmp_path: Path) -> None:
    script, expected = reference
    run_dir = tmp_path / "run"
    for nproc, steps in ((2, 20), (3, 40), (1, STEPS)):
        done = run(torchrun(nproc, script, run_dir, steps), timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
    assert [e["saved_world_size"] for e in _events(run_dir, "resume")] == [2, 3]
    got = _weights(run_dir, tmp_path)
    want = _weights_from_bytes(expected, tmp_path)
    for name, tensor in want.items():  # the same samples in the same steps: equal up to float summation order
        assert (got[name] - tensor).abs().max() < 1e-5, name


def test_sigterm_to_the_readme_loop_commits_the_step_and_exits_75(reference, tmp_path: Path) -> None:
    script, _ = reference
    run_dir, log = tmp_path / "run", tmp_path / "log"
    agent = subprocess.Popen(torchrun(2, script, run_dir, 100_000), cwd=REPO, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _committed(run_dir), 180, "the first commit")
        agent.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
        agent.wait(timeout=60)
    finally:
        kill_tree(agent.pid)
    [event] = _events(run_dir, "preempted")
    assert event["signal"] == "SIGTERM" and _committed(run_dir)[-1] == event["step"]
    assert "exitcode: 75" in log.read_text() or "exitcode  : 75" in log.read_text(), log.read_text()[-3000:]


def _weights(run_dir: Path, tmp_path: Path) -> dict:
    return _weights_from_bytes(export_weights(run_dir), tmp_path)


def _weights_from_bytes(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.safetensors"
    path.write_bytes(data)
    return load_file(str(path))
