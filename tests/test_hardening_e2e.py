"""Hardening, end to end: real torchrun, real signals, the model shapes users train. Seeded throughout.

- A language model whose head is tied to its token embedding and whose buffer views a parameter
  (dtrain/examples/tied.py), SIGKILLed at a random step and restarted by torchrun, ends bit for
  bit where an uninterrupted run ends, and its snapshots keep the aliases: under the default
  staging, and (marked slow) under fork staging.
- SIGTERM to `launch/torchrun.sh` while a save is in flight (a 14.6 MB save every 4 short steps),
  once one rank has written its shard: exit 75 within 30 s, the stopped step committed, verified
  and recorded in metrics.jsonl, and a resume to a fixed final step ends bit for bit where an
  uninterrupted run does. Trials 0-2 run in `make test`, 3-19 in `make soak`; each trial's delay
  comes from its number.
- A worker SIGKILLed while the writer it forked runs: no process of the run outlives torchrun.

    pytest tests/test_hardening_e2e.py -m "not slow"       # about 3.5 minutes on two idle cores
    pytest tests/test_hardening_e2e.py -k "sigterm and 17]"  # replay one preemption trial
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from chaos.launch import await_no_leftovers, committed_steps, last_step, read_metrics
from chaos.phases import shard_sizes
from dtrain.signals import EXIT_PREEMPTED
from dtrain.snapshot import layout
from support.procs import children, kill, kill_tree, wait_for, worker_ranks
from tests.conftest import REPO, dtrain_cmd, export_weights, run, torchrun_cmd, uninterrupted_weights

RESUMED = re.compile(r"resumed from snapshot step (\d+)")

TIED_STEPS = 60
TIED = ["--set", f"train.steps={TIED_STEPS}", "--set", "snapshot.every_steps=10", "--set", "snapshot.keep_last=100",
        "--set", "snapshot.keep_best=0", "--set", "snapshot.keep_every=0", "--set", "train.log_every_steps=1"]
"""The tied model at its defaults (examples/tied.toml); every snapshot kept, so the one a restart
resumed from can be read back."""

EVERY = 4
IN_FLIGHT = ["--set", f"snapshot.every_steps={EVERY}", "--set", "task.options.hidden=768",
             "--set", "train.global_batch_size=4", "--set", "train.log_every_steps=1"]
"""The built-in task with a 14.6 MB state and 4 samples a step, saved every 4 steps: the steps are
short, so 4 of them take about as long as a save. A save is in flight at almost any instant, and
the step boundary at which the ranks act on a signal falls at any point of it."""
FINAL_STEP = 80
"""Every preemption trial resumes to this step (or 10 past its stop, if it stopped later), so one
uninterrupted reference run serves them all."""
PREEMPTION_TRIALS, FAST_TRIALS = 20, 3
PROMPT_EXIT_SECONDS = 30.0
SHUTDOWN_SECONDS = 40
"""The launcher's grace period after a signal: above PROMPT_EXIT_SECONDS, so a run that hangs is
told from one that stops in time, and well below the launcher's default of 60 s, so it costs less."""
LEFTOVER_SECONDS = 5.0


# -- helpers --------------------------------------------------------------------------------------

def _train_args(config: str, run_dir: Path, *settings: str) -> list[str]:
    return ["train", "--config", config, "--run-dir", str(run_dir), *settings]


def _torchrun(run_dir: Path, args: list[str], max_restarts: int) -> subprocess.Popen:
    """torchrun in the background, its output in a file beside the run dir."""
    run_dir.mkdir(parents=True)
    with (run_dir.parent / "torchrun.log").open("w") as log:
        return subprocess.Popen(torchrun_cmd(2, *args, max_restarts=max_restarts), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _launch(run_dir: Path, log: Path, *args: str) -> subprocess.Popen:
    """`launch/torchrun.sh` on one node with two workers and no restarts, as a scheduler starts it;
    after a signal torchrun gives the workers SHUTDOWN_SECONDS, then SIGKILLs them."""
    steering = ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "MAX_RESTARTS", "RUN_DIR", "CONFIG")
    env = {k: v for k, v in os.environ.items()
           if k not in steering and not k.startswith(("PET_", "SLURM_", "TORCHELASTIC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               NPROC_PER_NODE="2", MAX_RESTARTS="0", RUN_DIR=str(run_dir), SHUTDOWN_TIMEOUT=str(SHUTDOWN_SECONDS))
    with log.open("w") as out:
        return subprocess.Popen([str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    """A shell cannot trap a signal that was ignored when it started (a test run under nohup)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code; None, with the whole tree SIGKILLed, if it ran past `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return None


def _trained(run_dir: Path) -> int:
    """The last step metrics.jsonl records (one row a step with `train.log_every_steps=1`); 0 before any."""
    return last_step(read_metrics(run_dir)) or 0


def _preempted(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]


def _saves_in_flight(run_dir: Path) -> list[str]:
    pending = run_dir / layout.PENDING
    return sorted(n for n in os.listdir(pending) if n.startswith("step_")) if pending.is_dir() else []


def _rank_file_sizes(run_dir: Path) -> dict[str, int]:
    """{rank-NNNNN.bin: bytes} from the newest committed snapshot ({} before one, or if retention
    removed it while it was read): every save at one world size writes the same sizes."""
    committed = committed_steps(run_dir)
    try:
        sizes = shard_sizes(run_dir, committed[-1]) if committed else {}
    except FileNotFoundError:
        return {}
    return {name: size for name, size in sizes.items() if name.startswith("rank-")}


def _a_shard_written(run_dir: Path, rank_files: dict[str, int]) -> str | None:
    """The save in flight in which some rank has written its whole shard, if there is one now.

    Each rank writes its per-rank file last, so that file at full size means the rank is done
    writing and reports, or waits for the outcome, through the store while the other rank or the
    commit is still under way: a signal then meets a save whose background threads use the store,
    as the ranks' agreement on the signal does."""
    for save in _saves_in_flight(run_dir):
        for name, size in rank_files.items():
            with contextlib.suppress(FileNotFoundError):
                if os.stat(run_dir / layout.PENDING / save / name).st_size == size:
                    return save
    return None


def _exported(target: Path, out: Path) -> dict[str, torch.Tensor]:
    """`dtrain ckpt export` of a run dir or one snapshot dir, read back."""
    done = run(dtrain_cmd("ckpt", "export", str(target), "--out", str(out)))
    assert done.returncode == 0, done.stdout[-3000:]
    return load_safetensors(out.read_bytes())


def _check_aliases(weights: dict[str, torch.Tensor], where: str) -> None:
    """The tied head and the buffer that views the position table must say what their parameters say."""
    names = sorted(weights)
    assert "tok.weight" in weights, f"{where}: no tok.weight among {names}"
    tok = weights["tok.weight"]
    zeros = int((tok == 0).sum())
    # A trained embedding holds no exact zeros; whole pages of them are bytes that were never written.
    assert zeros == 0, f"{where}: {zeros} of the {tok.numel()} values of tok.weight are exactly 0.0"
    if "head.weight" in weights:  # an export may also keep one name of a tied pair
        head = weights["head.weight"]
        differ = int((head != tok).sum())
        assert differ == 0, (f"{where}: head.weight is tok.weight (tied), yet {differ} of {tok.numel()} values differ "
                             f"({int((head == 0).sum())} of them 0.0 in head.weight)")
    if "pos_tail" in weights:
        assert torch.equal(weights["pos_tail"], weights["pos.weight"][1:]), \
            f"{where}: pos_tail is a view of pos.weight[1:], yet their values differ"


# -- a tied model, killed and resumed -------------------------------------------------------------

@pytest.mark.timeout(420)
@pytest.mark.parametrize("staging", ["default", pytest.param("fork", marks=pytest.mark.slow)])
@pytest.mark.parametrize("seed", [5])
def test_tied_model_killed_and_resumed_is_bit_identical(tmp_path: Path, seed: int, staging: str) -> None:
    rng = random.Random(seed)
    settings = [*TIED, *(() if staging == "default" else ("--set", f'snapshot.staging="{staging}"'))]
    reference_dir = tmp_path / "reference" / "run"
    done = run(torchrun_cmd(2, *_train_args("examples/tied.toml", reference_dir, *settings)))
    assert done.returncode == 0, done.stdout[-3000:]
    reference = export_weights(reference_dir)

    run_dir = tmp_path / "killed" / "run"
    agent = _torchrun(run_dir, _train_args("examples/tied.toml", run_dir, *settings), max_restarts=1)
    try:
        ranks = worker_ranks(agent.pid, 2)
        first = wait_for(lambda: committed_steps(run_dir), 120, "the first committed snapshot")[0]
        at, victim = rng.randint(first + 1, TIED_STEPS - 5), rng.randrange(2)
        wait_for(lambda: _trained(run_dir) >= at or agent.poll() is not None, 120, f"step {at}", interval=0.005)
        assert agent.poll() is None, "the run ended before the kill"
        assert kill(ranks[victim], signal.SIGKILL)
        code = _wait(agent, 240)
    finally:
        kill_tree(agent.pid)
    out = (run_dir.parent / "torchrun.log").read_text()
    assert code == 0, f"torchrun exited {code} after rank {victim} was SIGKILLed at step {at}:\n{out[-4000:]}"
    resumed = RESUMED.search(out)
    assert resumed, out[-3000:]
    step = int(resumed.group(1))

    _check_aliases(load_safetensors(reference), "the uninterrupted run's export")
    _check_aliases(_exported(run_dir / layout.committed_path(step), tmp_path / "resumed.safetensors"),
                   f"snapshot step {step}, which the restart resumed from")
    final = export_weights(run_dir)
    _check_aliases(load_safetensors(final), "the resumed run's export")  # still tied after the restore
    assert final == reference, (f"rank {victim} SIGKILLed at step {at}, resumed from step {step}: "
                                "the final weights differ from the uninterrupted run's")


# -- SIGTERM while a save is in flight --------------------------------------------------------------

@pytest.fixture(scope="module")
def in_flight_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], bytes]:
    """Exported weights of an uninterrupted run of the IN_FLIGHT settings to a step; one run per step."""
    cache: dict[int, bytes] = {}

    def weights_at(steps: int) -> bytes:
        if steps not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference-{steps}") / "run"
            cache[steps] = uninterrupted_weights(run_dir, *IN_FLIGHT, "--set", f"train.steps={steps}")
        return cache[steps]

    return weights_at


@pytest.mark.timeout(420)
@pytest.mark.parametrize("trial", [t if t < FAST_TRIALS else pytest.param(t, marks=pytest.mark.soak)
                                   for t in range(PREEMPTION_TRIALS)])
def test_sigterm_during_an_inflight_save_exits_75_with_the_step_committed(
        tmp_path: Path, trial: int, in_flight_reference: Callable[[int], bytes]) -> None:
    rng = random.Random(7000 + trial)
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _launch(run_dir, log, *IN_FLIGHT, "--set", "train.steps=100000")
    try:
        rank_files = wait_for(lambda: _rank_file_sizes(run_dir) or launcher.poll() is not None, 180,
                              "training to start and commit a snapshot")
        assert launcher.poll() is None, f"the launcher exited {launcher.returncode} early:\n{log.read_text()[-3000:]}"
        delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        # Then the first instant a save in flight has one rank's shard written: the signal lands in it.
        in_flight = wait_for(lambda: _a_shard_written(run_dir, rank_files), 30, "a save in flight", interval=0.001)
        before = _trained(run_dir)
        signalled = time.monotonic()
        os.kill(launcher.pid, signal.SIGTERM)  # what a scheduler does; the launcher passes it on
        code = _wait(launcher, 150)
        seconds = time.monotonic() - signalled
    finally:
        kill_tree(launcher.pid)
    where = (f"trial {trial}: SIGTERM {delay:.2f}s after the first commit, after step {before}, during the save "
             f"{in_flight} (a rank's shard written); the launcher exited {code} after {seconds:.1f}s")
    print(where)
    assert code == EXIT_PREEMPTED, f"{where}\n{log.read_text()[-4000:]}"
    assert seconds < PROMPT_EXIT_SECONDS, f"{where}\n{log.read_text()[-4000:]}"
    events = _preempted(run_dir)
    assert len(events) == 1, f"{where}: preempted events in metrics.jsonl: {events}"
    step = events[0]["step"]
    assert committed_steps(run_dir)[-1] == step, f"{where}: stopped at {step}, committed {committed_steps(run_dir)}"
    verified = run(dtrain_cmd("ckpt", "verify", str(run_dir)))
    assert verified.returncode == 0, f"{where}\n{verified.stdout}"

    final = max(FINAL_STEP, step + 10)
    resumed = run(torchrun_cmd(2, *_train_args("examples/demo.toml", run_dir, *IN_FLIGHT, "--set",
                                               f"train.steps={final}")))
    assert resumed.returncode == 0, f"{where}\n{resumed.stdout[-3000:]}"
    assert f"resumed from snapshot step {step}" in resumed.stdout, resumed.stdout[-3000:]
    assert export_weights(run_dir) == in_flight_reference(final), \
        f"{where}: stopped at step {step}, resumed to {final}: the weights differ from the uninterrupted run's"


# -- no process outlives its run --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [13])
def test_no_process_outlives_its_run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    args = _train_args("examples/demo.toml", run_dir, *IN_FLIGHT, "--set", "train.steps=100000",
                       "--set", 'snapshot.staging="fork"')
    agent = _torchrun(run_dir, args, max_restarts=0)
    try:
        ranks = worker_ranks(agent.pid, 2)
        wait_for(lambda: committed_steps(run_dir) or agent.poll() is not None, 180, "the first committed snapshot")
        # A few seconds of saves, each a fork on both ranks; a writer stuck in its fork also stays a child.
        time.sleep(rng.uniform(2.0, 6.0))
        assert agent.poll() is None, f"torchrun exited {agent.returncode} early"
        writing = wait_for(lambda: {r: kids for r, pid in ranks.items() if (kids := children(pid))}, 60,
                           "a writer forked by a worker", interval=0.002)
        victim = rng.choice(sorted(writing))
        assert kill(ranks[victim], signal.SIGKILL)  # mid-save: its writer is running
        code = _wait(agent, 150)
    finally:
        kill_tree(agent.pid)
    left = await_no_leftovers(run_dir, LEFTOVER_SECONDS)
    for p in left:
        kill(p.pid, signal.SIGKILL)
    assert code is not None, "torchrun did not exit within 150s of the kill"
    assert not left, (f"rank {victim} SIGKILLed while writer(s) {writing} ran; torchrun exited {code}; still alive "
                      f"{LEFTOVER_SECONDS:g}s later:\n" + "\n".join(map(str, left)))
