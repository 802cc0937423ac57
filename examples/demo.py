"""The whole story in one command (`make demo`): train under torchrun, lose a worker, resume, finish.

1. Two workers train the built-in task under `torchrun --max-restarts=3`; snapshots commit.
2. Once a few snapshots are committed, one worker is killed with SIGKILL, as a node failure would.
3. torchrun restarts the group; it resumes from the newest committed snapshot and finishes.
4. The run dir is listed and verified, the model exported for inference, and the run's report
   (loss curve, the kill and the resume, goodput) written to RUN_DIR/report.html.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--kill-after-snapshots", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)

    banner(f"1. training the built-in task on {args.nproc} workers under torchrun (run dir {run_dir})")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
         "--max-restarts=3", "--monitor-interval=0.5", "-m", "dtrain", "train",
         "--config", str(REPO / "examples" / "demo.toml"), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    echo = threading.Thread(target=forward_output, args=(agent,), daemon=True)
    echo.start()
    snapshots = run_dir / "snapshots"
    while agent.poll() is None and count_committed(snapshots) < args.kill_after_snapshots:
        time.sleep(0.05)
    victim = worker_pids(agent.pid)[-1:] if agent.poll() is None else []
    if victim:
        banner(f"2. {count_committed(snapshots)} snapshots committed: SIGKILL worker pid {victim[0]}")
        os.kill(victim[0], signal.SIGKILL)
        banner("3. torchrun notices, restarts the group, and the run resumes from the newest committed snapshot")
    code = agent.wait()
    echo.join()
    if code != 0:
        banner(f"torchrun exited with {code}")
        return code
    banner("4. the run finished; its committed snapshots, verified, the model exported, and the run's report")
    for cmd in (["ckpt", "list", str(run_dir)], ["ckpt", "verify", str(run_dir)],
                ["ckpt", "export", str(run_dir), "--best", "--out", str(run_dir / "best.safetensors")],
                ["status", str(run_dir)], ["report", str(run_dir)]):
        print(f"$ dtrain {' '.join(cmd)}", flush=True)
        done = subprocess.run([sys.executable, "-m", "dtrain", *cmd], cwd=REPO)
        if done.returncode != 0:
            return done.returncode
    return 0


def banner(text: str) -> None:
    print(f"\n=== {text}\n", flush=True)


def forward_output(agent: subprocess.Popen) -> None:
    for line in agent.stdout:
        if line.strip() and not line.startswith("[rank"):  # tracebacks of the killed group, abridged
            print(line, end="", flush=True)


def count_committed(snapshots: Path) -> int:
    if not snapshots.is_dir():
        return 0
    return sum(1 for p in snapshots.iterdir() if p.name.startswith("step_"))


def worker_pids(agent_pid: int) -> list[int]:
    """The agent's children running dtrain, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == agent_pid and b"dtrain" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


if __name__ == "__main__":
    raise SystemExit(main())
