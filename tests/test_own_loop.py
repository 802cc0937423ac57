"""A training loop of the user's own, on the public API alone: the README's example, extracted from
the README and run under real torchrun, killed, preempted and resumed on other world sizes."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dtrain.snapshot import catalog, layout
from dtrain.storage import LocalStorage
from support.procs import children, kill, kill_tree, rank_of, wait_for
from tests.conftest import REPO, export_weights, run

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


LEDGER = """
import os
from torch.nn.parallel import DistributedDataParallel

_forward = DistributedDataParallel.forward


def forward(self, x, *args, **kwargs):  # each line: the first feature of every row this rank trains on
    with open(os.path.join(os.environ["LEDGER_DIR"], f"rank{os.environ['RANK']}-{os.getpid()}"), "a") as f:
        f.write(" ".join(repr(v) for v in x[:, 0].tolist()) + "\\n")
    return _forward(self, x, *args, **kwargs)


DistributedDataParallel.forward = forward
"""
"""A `sitecustomize` that records, without touching the program, which samples each step trained on."""


def torchrun(nproc: int, script: Path, run_dir: Path, steps: int, max_restarts: int = 0) -> list[str]:
    """The README's command line. `env` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says to:
    with torch 2.13's shared store a restarted gloo group can read the dead group's addresses."""
    return ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", str(script), str(run_dir), str(steps)]


def _workers(agent_pid: int, world_size: int) -> dict[int, int]:
    """{rank: pid} of a torchrun agent's workers, waiting until all of them exist."""
    def found() -> dict[int, int]:
        ranks = {r: p for p in children(agent_pid) if (r := rank_of(p)) is not None}
        return ranks if len(ranks) == world_size else {}
    return wait_for(found, 120, f"{world_size} workers of torchrun agent {agent_pid}")


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
        victim = _workers(agent.pid, 2)[rng.randrange(2)]
        assert kill(victim, signal.SIGKILL)
        assert agent.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        kill_tree(agent.pid)
    assert _events(run_dir, "resume"), "the restarted group did not resume"
    assert export_weights(run_dir) == expected


def test_the_readme_loop_resumed_2_3_1_reads_every_sample_exactly_once(reference, tmp_path: Path) -> None:
    """Each step at 2, then 3, then 1 rank trains on exactly the global batch of the uninterrupted run."""
    script, _ = reference
    straight = _ledger_run(script, tmp_path / "straight", [(2, STEPS)])
    resumed = _ledger_run(script, tmp_path / "resumed", [(2, 20), (3, 40), (1, STEPS)])
    assert [e["saved_world_size"] for e in _events(tmp_path / "resumed" / "run", "resume")] == [2, 3]
    assert resumed == straight
    ids = [i for batch in resumed for i in batch]
    assert len(ids) == STEPS * 64 and sorted(ids[:2048]) == list(range(2048))  # the first epoch: each sample once


def _ledger_run(script: Path, where: Path, attempts: list[tuple[int, int]]) -> list[list[int]]:
    """Run `attempts` ((world size, stop step), ...) on one run dir; each step's global batch, as sample ids."""
    import os

    ledgers, hooks = where / "ledger", where / "hooks"
    ledgers.mkdir(parents=True)
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LEDGER)
    env = {"LEDGER_DIR": str(ledgers), "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)])}
    steps: list[list[int]] = []
    for nproc, stop in attempts:
        done = run(torchrun(nproc, script, where / "run", stop), timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:]
        files = sorted(ledgers.iterdir(), key=lambda p: int(p.name.split("-")[0][4:]))
        rows = [p.read_text().splitlines() for p in files]
        steps += [[i for rank in rows for i in _sample_ids(rank[k])] for k in range(len(rows[0]))]
        for p in files:
            p.unlink()
    return steps


def _sample_ids(line: str) -> list[int]:
    """The dataset indices of a batch, from the first feature of each row (the README's data, seed 1)."""
    import torch

    first = torch.randn(2048, 32, generator=torch.Generator().manual_seed(1))[:, 0].tolist()
    index = {repr(v): i for i, v in enumerate(first)}
    return [index[v] for v in line.split()]


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
    [event] = _events(run_dir, "preempted")  # every rank stopped at this step, and it is committed
    assert event["signal"] == "SIGTERM" and set(event["signaled_ranks"]) == {0, 1}
    assert _committed(run_dir)[-1] == event["step"] and event["snapshot"] == layout.committed_path(event["step"])
    again = run(torchrun(2, script, run_dir, event["step"] + 5), timeout=300)  # the same command resumes
    assert again.returncode == 0, again.stdout[-3000:]
    assert _events(run_dir, "resume")[-1]["step"] == event["step"]


def test_sigusr1_to_one_worker_of_the_readme_loop_stops_both_with_exit_code_75(reference, tmp_path: Path) -> None:
    """SLURM's `--signal` reaches one task: both ranks stop at one step, each worker exits 75."""
    script, _ = reference
    run_dir, log = tmp_path / "run", tmp_path / "log"
    agent = subprocess.Popen(torchrun(2, script, run_dir, 100_000), cwd=REPO, stdout=log.open("w"),
                             stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _committed(run_dir), 180, "the first commit")
        assert kill(_workers(agent.pid, 2)[1], signal.SIGUSR1)
        agent.wait(timeout=120)
    finally:
        kill_tree(agent.pid)
    [event] = _events(run_dir, "preempted")
    assert (event["signal"], event["signaled_ranks"]) == ("SIGUSR1", [1])
    assert _committed(run_dir)[-1] == event["step"]
    assert "exitcode: 75" in log.read_text(), log.read_text()[-3000:]  # torchrun saw the preemption code


def test_preempted_is_exit_code_75_when_uncaught() -> None:
    done = run([sys.executable, "-c", "import dtrain; raise dtrain.Preempted(12)"], timeout=60)
    assert done.returncode == 75 and "Traceback" not in done.stdout


def _weights(run_dir: Path, tmp_path: Path) -> dict:
    return _weights_from_bytes(export_weights(run_dir), tmp_path)


def _weights_from_bytes(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.safetensors"
    path.write_bytes(data)
    return load_file(str(path))
