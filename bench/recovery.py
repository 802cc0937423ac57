"""Recovery: SIGKILL one worker of a `dtrain train` under torchrun, and time until training is back.

    .venv/bin/python -m bench.recovery --state-gb 0.25 --kills 3

One launch of the built-in task (2 workers, `torchrun --max-restarts`), its model sized to hold
about `--state-gb` of parameters and Adam state, a snapshot every `--every` steps. Once a snapshot
is committed, a worker is SIGKILLed; the clock stops at the first step rank 0 finishes after the
restarted group resumed. Then the next kill, `--kills` times. Per kill:

    resumed s   kill -> training restarted (torchrun noticed, tore down, restarted the group,
                the workers imported torch, joined, and restored the snapshot)
    recovery s  kill -> the first step finished after the resume
    replayed    steps finished before the kill that had to be trained again

`make bench` runs it after the snapshot tables and adds its medians to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chaos.launch import STARTED, STEP, Launch, Settings, committed_steps  # noqa: E402
from support.procs import kill, ranks_now  # noqa: E402

LAYERS = 4
_POLL_S = 0.01


def hidden_for(state_bytes: float) -> int:
    """The teacher MLP width whose parameters plus Adam state (3 x 4 bytes each) hold about `state_bytes`."""
    return max(64, math.ceil(math.sqrt(state_bytes / (12 * LAYERS)) / 64) * 64)


def measure(state_gb: float, kills: int, every: int, work: Path, say: Any = print) -> dict[str, Any]:
    """Run the launch, kill `kills` times; every kill's figures and their medians."""
    hidden = hidden_for(state_gb * (1 << 30))
    cfg = Settings(("train.steps=1000000", f"snapshot.every_steps={every}", "snapshot.keep_last=2",
                    "snapshot.keep_best=0", "snapshot.keep_every=0", "train.log_every_steps=1",
                    f"task.options.hidden={hidden}", f"task.options.layers={LAYERS}"))
    launch = Launch(work / "run", cfg.train_args(work / "run"), work / "recovery.log", max_restarts=kills + 2)
    rows = []
    try:
        launch.await_start()
        for i in range(kills):
            _await_commit(launch, after=max(committed_steps(launch.run_dir), default=0))
            rows.append(_kill_and_time(launch, victim=1))
            say(f"recovery: kill {i + 1}/{kills}: back in {rows[-1]['recovery_s']:.2f} s "
                f"(resumed at {rows[-1]['resumed_s']:.2f} s), {rows[-1]['replayed']} steps replayed")
    finally:
        launch.stop()
    return {"state_gb": state_gb, "hidden": hidden, "layers": LAYERS, "every": every, "kills": rows,
            **{f"{k}_median": statistics.median(r[k] for r in rows) for k in ("resumed_s", "recovery_s", "replayed")}}


def _await_commit(launch: Launch, after: int, timeout: float = 600) -> None:
    """Wait for a snapshot newer than `after`, and two steps past it, so the kill lands mid-training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        launch.watch.poll()
        steps = committed_steps(launch.run_dir)
        done = _last_step(launch.watch.lines)
        if steps and steps[-1] > after and done is not None and done >= steps[-1] + 2:
            return
        if launch.proc.poll() is not None:
            raise RuntimeError(f"torchrun exited {launch.proc.returncode}:\n{launch.tail()}")
        time.sleep(_POLL_S)
    raise RuntimeError(f"no new snapshot within {timeout:g}s:\n{launch.tail()}")


def _kill_and_time(launch: Launch, victim: int) -> dict[str, Any]:
    launch.watch.poll()
    before = len(launch.watch.lines)
    last = _last_step(launch.watch.lines) or 0
    pid = ranks_now(launch.pid)[victim]
    start = time.monotonic()
    kill(pid, 9)
    resumed_at, resumed_step = None, None
    while time.monotonic() - start < 600:
        for line in launch.watch.poll():
            if resumed_at is None and (m := STARTED.search(line)):
                resumed_at, resumed_step = time.monotonic(), int(m.group(1) or 0)
            elif resumed_at is not None and STEP.search(line):
                return {"resumed_s": resumed_at - start, "recovery_s": time.monotonic() - start,
                        "replayed": last - resumed_step, "killed_after_step": last}
        if launch.proc.poll() is not None:
            break
        time.sleep(_POLL_S)
    raise RuntimeError(f"training did not come back after the kill:\n{chr(10).join(launch.watch.lines[before:][-40:])}")


def _last_step(lines: list[str]) -> int | None:
    for line in reversed(lines):
        if m := STEP.search(line):
            return int(m.group(1))
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-gb", type=float, default=0.25, help="parameters + Adam state, GiB (default 0.25)")
    p.add_argument("--kills", type=int, default=3, help="kills, median reported (default 3)")
    p.add_argument("--every", type=int, default=10, help="snapshot every N steps (default 10)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dtrain-recovery-", dir=REPO) as work:
        print(json.dumps(measure(args.state_gb, args.kills, args.every, Path(work)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
