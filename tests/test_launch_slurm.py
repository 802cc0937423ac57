"""launch/slurm.sbatch on a real single-node SLURM cluster: preempted twice, requeued, resumed, exact.

The module starts its own munged, slurmctld and slurmd on 127.0.0.1 (own slurm.conf, state and
ports in a temp dir) and stops them by pid. Install SLURM with launch/ci/install-slurm.sh; without
it, or where the daemons cannot start, the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.procs import wait_for
from tests.conftest import REPO, dtrain_cmd, run, uninterrupted_weights
from tests.conftest import export_weights as _export

pytestmark = pytest.mark.slow

SBATCH = REPO / "launch" / "slurm.sbatch"
SETTINGS = ["--set", "train.steps=400", "--set", "snapshot.every_steps=50", "--set", "train.log_every_steps=50"]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")

SLURM_CONF = """\
ClusterName=dtraintest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]

    def cmd(self, *args: str, timeout: float = 30) -> str:
        done = run(list(args), timeout=timeout, env=self.env)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}: {done.stdout}"
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, Reason, ExitCode, ..."""
        out = self.cmd("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float, **expect: str) -> dict[str, str]:
        def reached() -> dict[str, str] | None:
            info = self.job(job_id)
            ok = info.get("JobState") in states and all(info.get(k) == v for k, v in expect.items())
            return info if ok else None
        return wait_for(reached, timeout, f"job {job_id} in {states} with {expect}", interval=0.5)

    def daemon_log(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pids: list[int | None]) -> None:
    """SIGTERM each daemon, SIGKILL what is still there after a deadline."""
    pids = [p for p in pids if p]
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): run launch/ci/install-slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(), slurmd_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_"))}
    started: list[Path] = []
    try:
        for argv, pidfile in [
            (["munged", "--force", f"--socket={root}/munge/munge.sock", f"--key-file={key}",
              f"--log-file={root}/log/munged.log", f"--pid-file={root}/munge/munged.pid",
              f"--seed-file={root}/munge/seed"], root / "munge" / "munged.pid"),
            (["slurmctld", "-f", str(conf)], root / "slurmctld.pid"),
            (["slurmd", "-f", str(conf), "-N", "localhost"], root / "slurmd.pid"),
        ]:
            done = run(argv, timeout=30, env=env)  # each daemonizes and writes its pid file
            if done.returncode != 0:
                pytest.skip(f"{argv[0]} did not start (exit {done.returncode}): {done.stdout[-1000:]}")
            started.append(pidfile)
            wait_for(lambda pidfile=pidfile: _pid(pidfile), 15, f"{pidfile.name}")
        c = Cluster(root, env)

        def node_idle() -> bool:
            out = run(["sinfo", "--noheader", "--format=%t"], timeout=30, env=env).stdout
            return out.strip() == "idle"
        try:
            wait_for(node_idle, 30, "the node to be idle", interval=0.5)
        except AssertionError:
            pytest.skip(f"local SLURM cluster did not come up:\n{c.daemon_log()}")
        yield c
    finally:
        if started:
            run(["scancel", "--full", "--user=root"], timeout=30, env=env)
        _stop([_pid(p) for p in reversed(started)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return uninterrupted_weights(tmp_path_factory.mktemp("reference") / "run", *SETTINGS)


def _listed(run_dir: Path) -> list[dict]:
    done = run(dtrain_cmd("ckpt", "list", str(run_dir), "--json"))
    assert done.returncode == 0, done.stdout
    return json.loads(done.stdout)


def _steps(run_dir: Path) -> list[int]:
    snaps = run_dir / "snapshots"
    return sorted(int(p.name[5:]) for p in snaps.glob("step_*")) if snaps.is_dir() else []


def _preempted(cluster: Cluster, job: str, run_dir: Path, restarts: int, preempt: list[str]) -> int:
    """Wait for a snapshot newer than those there now, preempt, return the emergency snapshot's step."""
    before = _steps(run_dir)
    at_signal = wait_for(lambda: _steps(run_dir)[-1:] if _steps(run_dir) != before else None,
                         180, "a new committed snapshot")[0]
    cluster.cmd(*preempt)
    cluster.wait_state(job, {"PENDING"}, 120, Restarts=str(restarts))
    emergency = _listed(run_dir)[-1]
    assert at_signal < emergency["step"] < 400, (at_signal, emergency)
    assert emergency["world_size"] == 2
    cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the requeue delay
    return emergency["step"]


@pytest.mark.timeout(1200)
def test_requeued_job_resumes_from_its_emergency_snapshot(cluster: Cluster, tmp_path: Path,
                                                           reference: bytes) -> None:
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm.out"
    job = cluster.cmd(
        "sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={out}",
        f"--export=ALL,RUN_DIR={run_dir},NPROC_PER_NODE=2,RDZV_PORT={_free_port()},OMP_NUM_THREADS=1",
        str(SBATCH), *SETTINGS, timeout=60).strip()
    try:
        # The time limit's warning signal (--signal=B:USR1@...) as `scancel` sends it: batch shell only.
        first = _preempted(cluster, job, run_dir, 1, ["scancel", "--signal=USR1", "--batch", job])
        # An administrator's requeue: SIGTERM to every process of the job.
        second = _preempted(cluster, job, run_dir, 2, ["scontrol", "requeue", job])
        info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
        log = out.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    finally:
        run(["scancel", job], timeout=30, env=cluster.env)

    assert log.count("job step exited 75") == 2, log[-4000:]
    for count in range(3):
        assert f"SLURM_RESTART_COUNT={count}" in log
    assert f"resumed from snapshot step {first}" in log and f"resumed from snapshot step {second}" in log
    resumes = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "resume"]
    # torchrun may restart a failed worker group, which resumes again from the same snapshot.
    assert list(dict.fromkeys(r["step"] for r in resumes)) == [first, second]
    assert _export(run_dir) == reference
