"""Crash consistency in a bucket: SIGKILL a worker in every phase of a save to S3, then check.

    python -m chaos.run --only s3crash --s3-trials 20 --seed 7

A SeaweedFS server (`support.seaweed`) holds one run prefix; each trial is one
`torchrun --max-restarts 0` launch on it that resumes from what the previous kill left, trains, and
loses one worker to SIGKILL, at a random moment or at the first sight of a save phase in the bucket
(polled every few milliseconds from this process):

    shard upload         a step_N/ holds objects but no manifest, and no multipart upload is open
    multipart in flight  a multipart upload is open under snapshots/ (a shard larger than one part)
    manifest put         a manifest exists that `latest` does not name yet (between the commit and the hint)
    retention delete     a step_N/ without a manifest below the newest committed step (a snapshot half deleted)

The phase is where the kill was aimed and last seen before it; a worker may have moved on by the
instant SIGKILL lands. After each kill, every snapshot whose manifest exists must verify (every
file present, of its size and CRC-32C): a torn load is a violation. The next launch must, by the
time it trains, have deleted what the kill left: each manifest-less step_N/ seen after the kill
(unless that step has been committed since) and each multipart upload that was open.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtrain.snapshot import catalog, layout, reader
from dtrain.storage.s3 import S3Storage
from support.procs import kill, kill_tree, ranks_now, wait_for
from support.seaweed import SeaweedServer
from tests.conftest import REPO, torchrun_cmd

BUCKET = "chaos"
PREFIX = "run"
PHASES = ("shard upload", "multipart in flight", "manifest put", "retention delete")
TARGETS = ("random", *PHASES)
SETTINGS = ("train.steps=1000000", "snapshot.every_steps=3", "snapshot.keep_last=2", "snapshot.keep_best=0",
            "snapshot.keep_every=0", "snapshot.file_mb=24", "task.options.hidden=1024", "train.log_every_steps=1")
"""Frequent saves of about 26 MB in files up to 24 MB, so the largest go up in parts, and a
retention delete after each commit."""


@dataclass
class S3Trial:
    index: int
    target: str
    seen: str | None = None
    victim_rank: int | None = None
    committed: list[int] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    """What the kill left in the bucket: manifest-less step dirs and open multipart uploads."""
    not_cleaned: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        return [f"torn: {t}" for t in self.torn] + [f"not cleaned at the next start: {n}" for n in self.not_cleaned]


class S3CrashHarness:
    def __init__(self, work: Path, seed: int, trials: int, say: Callable[[str], None] = print) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.trials = trials
        self.say = say

    def run(self) -> list[S3Trial]:
        self.work.mkdir(parents=True, exist_ok=True)
        with SeaweedServer(self.work / "weed") as server, _environment(server.env()):
            server.create_bucket(BUCKET)
            self.env = {**os.environ, "OMP_NUM_THREADS": "1", "DTRAIN_LOCAL_DIR": str(self.work / "local")}
            self.storage = S3Storage(BUCKET, PREFIX)
            done: list[S3Trial] = []
            for i in range(self.trials):
                trial = self._trial(i, TARGETS[i % len(TARGETS)], done[-1] if done else None)
                done.append(trial)
                self.say(f"s3 trial {i}: aimed at {trial.target}, seen {trial.seen}, committed {trial.committed}, "
                         f"left {len(trial.left)}, violations {trial.violations or 'none'}")
            if done:
                last = self._launch(self.trials)
                kill_tree(last.pid)
                last.wait()
                self._check_cleaned(done[-1], self.trials)
        return done

    def _trial(self, index: int, target: str, previous: S3Trial | None) -> S3Trial:
        trial = S3Trial(index, target)
        agent = self._launch(index)
        try:
            if previous is not None:
                self._check_cleaned(previous, index)
            trial.seen = self._await_phase(target, agent)
            workers = ranks_now(agent.pid)
            trial.victim_rank = self.rng.choice(sorted(workers))
            kill(workers[trial.victim_rank], signal.SIGKILL)
            agent.wait(timeout=120)
        finally:
            kill_tree(agent.pid)
            agent.wait()
        trial.left = self._leftovers()
        trial.committed = catalog.committed_steps(self.storage)
        trial.torn = [p for step in trial.committed for p in reader.verify(self.storage, step)]
        return trial

    def _launch(self, index: int) -> subprocess.Popen:
        sets = [a for kv in SETTINGS for a in ("--set", kv)]
        args = ["train", "--config", "examples/demo.toml", "--run-dir", f"s3://{BUCKET}/{PREFIX}", *sets]
        log = self._log(index)
        with log.open("w") as out:
            agent = subprocess.Popen(torchrun_cmd(2, *args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        wait_for(lambda: "resumed from snapshot" in log.read_text() or "starting a new run" in log.read_text()
                 or agent.poll() is not None, 300, "training to start")
        if agent.poll() is not None:
            raise AssertionError(f"torchrun exited {agent.returncode} before training: {log.read_text()[-3000:]}")
        return agent

    def _await_phase(self, target: str, agent: subprocess.Popen) -> str | None:
        if target == "random":
            time.sleep(self.rng.uniform(0.5, 5.0))
            return "random"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and agent.poll() is None:
            if target in self._phases_now():
                return target
            time.sleep(0.005)
        return None  # not sighted: killed anyway, where it was

    def _phases_now(self) -> set[str]:
        found = set()
        uploads = self._uploads()
        if uploads:
            found.add("multipart in flight")
        steps = catalog.committed_steps(self.storage)
        for name in catalog.uncommitted_step_dirs(self.storage):
            step = layout.parse_step_dir(name)
            if steps and step < steps[-1]:
                found.add("retention delete")
            elif not uploads:
                found.add("shard upload")
        if steps:
            try:
                latest = self.storage.read_bytes(layout.LATEST, 100).decode().strip()
            except OSError:
                latest = ""
            if latest != layout.step_dir_name(steps[-1]):
                found.add("manifest put")
        return found

    def _uploads(self) -> list[str]:
        response = self.storage.client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        return [f"upload {u['Key']} {u['UploadId']}" for u in response.get("Uploads", [])]

    def _leftovers(self) -> list[str]:
        return [*(f"dir {n}" for n in catalog.uncommitted_step_dirs(self.storage)), *self._uploads()]

    def _check_cleaned(self, trial: S3Trial, index: int) -> None:
        """Called once launch `index` trains: its rank 0 cleaned before that, so what the kill left is
        gone: each open upload (upload ids are never reused) and each step dir, which it names in its log."""
        log = self._log(index).read_text()
        uploads = set(self._uploads())
        for item in trial.left:
            kind, name = item.split()[:2]
            still_there = item in uploads if kind == "upload" else f"leftover {layout.SNAPSHOTS}/{name}" not in log
            if still_there:
                trial.not_cleaned.append(item)

    def _log(self, index: int) -> Path:
        return self.work / f"launch-{index}.log"

@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment (the S3 client reads its endpoint there), then the old ones."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def summary(trials: list[S3Trial]) -> dict[str, Any]:
    return {"trials": [asdict(t) | {"violations": t.violations} for t in trials],
            "violations": [f"trial {t.index}: {v}" for t in trials for v in t.violations]}


def table(trials: list[S3Trial]) -> str:
    rows = [f"\ns3 crash consistency: {len(trials)} trials against SeaweedFS, snapshot every 3 steps",
            f"{'aimed at':<20} {'trials':>6} {'sighted':>7} {'left litter':>11} {'torn':>5} {'not cleaned':>11}"]
    for target in TARGETS:
        ts = [t for t in trials if t.target == target]
        rows.append(f"{target:<20} {len(ts):>6} {sum(t.seen == target for t in ts):>7} "
                    f"{sum(bool(t.left) for t in ts):>11} {sum(len(t.torn) for t in ts):>5} "
                    f"{sum(len(t.not_cleaned) for t in ts):>11}")
    rows += [f"VIOLATION {v}" for v in summary(trials)["violations"]]
    return "\n".join(rows)
