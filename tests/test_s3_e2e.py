"""`--run-dir s3://...` end to end: the real command line under torchrun (2 ranks) against a real
SeaweedFS server. No mock anywhere: SIGKILLed workers, a corrupted object, two ranks that share
nothing but the bucket, and the server itself killed while saves are in flight.

Each test is one story (several runs in a row) so that `pytest -n 2` never splits a story over
two workers, each of which would start a server and train the reference run again.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtrain.snapshot import catalog, layout
from dtrain.storage.s3 import S3Storage
from support.procs import kill, kill_tree, wait_for, workers
from support.seaweed import SeaweedServer, free_ports
from tests.conftest import REPO, dtrain_cmd, run, torchrun_cmd
from tests.distributed import run_ranks
from tests.test_elastic import DATA as ELASTIC_DATA
from tests.test_elastic import PHASES as ELASTIC_PHASES
from tests.test_elastic import STEPS_PER_EPOCH, _merged_ledger
from tests.workloads import train

BUCKET = "dtrain-e2e"
CONFIG = str(REPO / "examples" / "demo.toml")
SETTINGS = ["--set", "train.steps=40", "--set", "snapshot.every_steps=10", "--set", "task.options.hidden=256",
            "--set", "task.options.num_samples=2048", "--set", "train.log_every_steps=10"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path / "weed") as s:
        s.create_bucket(BUCKET)
        yield s


def _env(server: SeaweedServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**server.env(), "DTRAIN_LOCAL_DIR": str(tmp_path / "local"), "OMP_NUM_THREADS": "1", **extra}


def _storage(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, prefix: str) -> S3Storage:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return S3Storage(BUCKET, prefix)


def _train(url: str, *settings: str) -> list[str]:
    return ["train", "--config", CONFIG, "--run-dir", url, *SETTINGS, *settings]


def _export(url: str, out: Path, env: dict[str, str]) -> bytes:
    done = run(dtrain_cmd("ckpt", "export", url, "--out", str(out)), env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    return out.read_bytes()


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """In the background, its output to a file (a pipe nobody reads would block the workers)."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)


def _finish(agent: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(agent.pid)
        agent.wait()
    return agent.returncode, log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)  # four training runs in a row
def test_sigkill_resume_and_a_corrupted_object(server: SeaweedServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(server, tmp_path)
    reference_url, killed_url = f"s3://{BUCKET}/reference", f"s3://{BUCKET}/killed"
    done = run(torchrun_cmd(2, *_train(reference_url)), env=env)
    assert done.returncode == 0, done.stdout[-4000:]
    assert not (REPO / "s3:").exists()  # once taken for a relative path: a local dir named `s3:`
    reference = _export(reference_url, tmp_path / "reference.safetensors", env)

    # A worker SIGKILLed at a random instant once a snapshot committed; torchrun restarts the group.
    rng = random.Random(16)
    killed = _storage(server, monkeypatch, "killed")
    agent = _start(torchrun_cmd(2, *_train(killed_url), max_restarts=2), tmp_path / "killed.log", env)
    wait_for(lambda: catalog.committed_steps(killed), 180, "the first committed snapshot", interval=0.2)
    time.sleep(rng.uniform(0.0, 0.5))
    assert kill(rng.choice(workers(agent.pid)), signal.SIGKILL)
    code, out = _finish(agent, tmp_path / "killed.log")
    assert code == 0 and "resumed from snapshot step" in out, out[-4000:]
    assert _export(killed_url, tmp_path / "killed.safetensors", env) == reference
    assert run(dtrain_cmd("ckpt", "verify", killed_url), env=env).returncode == 0
    assert not killed.client.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads")

    # One byte flipped in the newest snapshot's object: verify names it, resume skips it and
    # trains the same steps again, replacing it, to the same weights.
    storage = _storage(server, monkeypatch, "reference")
    victim = f"{layout.committed_path(40)}/replicated-00000.bin"
    data = bytearray(storage.read_bytes(victim, 1 << 30))
    data[len(data) // 2] ^= 0x10
    storage.write_atomic(victim, bytes(data))
    verified = run(dtrain_cmd("ckpt", "verify", reference_url), env=env)
    assert verified.returncode == 1
    assert re.search(r"BAD s3://dtrain-e2e/reference/snapshots/step_000000040\n.*replicated-00000\.bin: checksum "
                     "mismatch", verified.stdout), verified.stdout
    done = run(torchrun_cmd(2, *_train(reference_url)), env=env)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "step_000000040 failed verification" in done.stdout
    assert "resumed from snapshot step 30" in done.stdout
    assert _export(reference_url, tmp_path / "again.safetensors", env) == reference
    assert run(dtrain_cmd("ckpt", "verify", reference_url), env=env).returncode == 0


@pytest.mark.slow
def test_two_ranks_that_share_only_the_bucket_commit_together(server: SeaweedServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes as two nodes: each its own empty working dir, no torchrun, no shared files."""
    port = free_ports(1)[0]
    url = f"s3://{BUCKET}/nodes"
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("DTRAIN_LOCAL_DIR", None)
        log = (tmp_path / f"node{rank}.log").open("w")
        procs.append(subprocess.Popen(dtrain_cmd(*_train(url, "--set", "train.steps=20")), cwd=node,
                                      stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    for rank, p in enumerate(procs):
        code, out = _finish(p, tmp_path / f"node{rank}.log")
        assert code == 0, out[-4000:]
    storage = _storage(server, monkeypatch, "nodes")
    assert catalog.committed_steps(storage) == [10, 20]
    manifest = catalog.read_manifest(storage, 20)
    assert manifest.world_size == 2 and {f.writer for f in manifest.files.values()} == {0, 1}
    assert run(dtrain_cmd("ckpt", "verify", url), env=server.env()).returncode == 0
    # Each node kept only its own local things: rank 0 the metrics, nobody a snapshot.
    assert (tmp_path / "node0" / "dtrain-local" / BUCKET / "nodes" / layout.METRICS).is_file()
    assert not list((tmp_path / "node1").rglob(layout.METRICS))
    assert not list(tmp_path.glob("node*/**/step_*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_killed_while_saving(server: SeaweedServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves fail while the server is down, training goes on, and saves commit again once it is back;
    what was committed before stays intact throughout."""
    env = _env(server, tmp_path, AWS_MAX_ATTEMPTS="2")
    url = f"s3://{BUCKET}/outage"
    storage = _storage(server, monkeypatch, "outage")
    settings = ["--set", "train.steps=100000", "--set", "snapshot.every_steps=5", "--set", "snapshot.keep_last=1000",
                "--set", "snapshot.keep_best=0", "--set", "snapshot.keep_every=0",
                "--set", "snapshot.max_consecutive_failures=1000", "--set", "snapshot.timeout_seconds=30"]
    agent = _start(torchrun_cmd(2, *_train(url, *settings)), tmp_path / "outage.log", env)
    try:
        wait_for(lambda: len(catalog.committed_steps(storage)) >= 2, 180, "two committed snapshots", interval=0.2)
        time.sleep(random.Random(7).uniform(0.0, 0.3))
        server.kill()
        before = _committed_after_restart_of(server, tmp_path / "outage.log")
        wait_for(lambda: catalog.committed_steps(storage)[-1] > before[-1], 120, "a commit after the outage",
                 interval=0.2)
    finally:
        kill_tree(agent.pid)
        agent.wait()
    out = (tmp_path / "outage.log").read_text()
    assert "SNAPSHOT FAILED" in out and "training continues" in out, out[-4000:]
    for step in before:  # each snapshot committed before the outage reads back whole
        assert run(dtrain_cmd("ckpt", "verify", f"{url}/snapshots/{layout.step_dir_name(step)}"),
                   env=env).returncode == 0


def _committed_after_restart_of(server: SeaweedServer, log: Path) -> list[int]:
    """Restart the server once a save has failed against it; the steps committed before the outage."""
    wait_for(lambda: "SNAPSHOT FAILED" in log.read_text(), 120, "a save that failed while the server is down")
    server.start()
    steps = catalog.committed_steps(S3Storage(BUCKET, "outage"))
    assert steps, "the snapshots committed before the outage are gone"
    return steps



@pytest.mark.slow
@pytest.mark.timeout(600)
def test_world_size_2_3_1_reads_every_sample_exactly_once(server: SeaweedServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2 -> 3 -> 1 run of test_elastic, its snapshots in the bucket."""
    storage = _storage(server, monkeypatch, "elastic")
    phases = [run_ranks(train, world, str(tmp_path / "local"), [*ELASTIC_DATA, f"train.steps={steps}"], storage)
              for world, steps in ELASTIC_PHASES]
    ledger: dict[int, list[int]] = {}
    for results in phases:
        assert not [r["error"] for r in results if r["error"]]
        for step, ids in _merged_ledger(results).items():
            assert step not in ledger, f"step {step} was trained twice"
            ledger[step] = ids
    last = ELASTIC_PHASES[-1][1]
    assert sorted(ledger) == list(range(last))
    epoch0 = Counter(i for step in range(STEPS_PER_EPOCH) for i in ledger[step])
    assert sorted(epoch0) == list(range(470)) and set(epoch0.values()) == {1}, "duplicates or skips in epoch 0"
    epoch1 = [i for step in range(STEPS_PER_EPOCH, last) for i in ledger[step]]
    assert len(epoch1) == len(set(epoch1)) == 32 * (last - STEPS_PER_EPOCH)
    assert [r["resumed_from"] for r in (phases[1][0], phases[2][0])] == [5, 11]
    assert catalog.read_manifest(storage, last).world_size == 1
    assert not list((tmp_path / "local").rglob("step_*"))  # every snapshot went to the bucket
