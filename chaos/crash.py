"""Crash consistency: SIGKILL a worker in every phase of a save, then check what a restart finds.

    python -m chaos.run --only crash --trials 200 --seed 7
    pytest tests/test_crash_consistency.py --chaos-trials 12      # CHAOS_SEED=7 replays a seed

Two workloads take turns, trial by trial, each with its own run dir (`--workload` picks one):
`teacher`, the built-in MLP, and `tied`, a small language model whose output head is tied to its
token embedding and whose buffer is a view of a parameter (dtrain/examples/tied.py), saved in
1 MiB files so its largest tensors are split over files. Both staging modes take turns too, a
round of workloads at a time (`--staging` picks one): `copy`, the default, and `fork`, whose
writer is a forked child of each worker. The trials of one workload form a chain on its run dir.
Each is one fresh `torchrun --max-restarts 0` launch: it resumes from what the previous kill of
that workload left, trains, and one worker gets SIGKILL, either at a random moment or in a
chosen phase of a save. The run dir is polled about every millisecond for the
phase's signature (`chaos.phases`); on a sighting both workers are SIGSTOPped and the run dir and
rank 0's log read again: if the frozen run is still in that phase the victim gets SIGKILL there and
the survivor SIGCONT, otherwise both go on and the poll continues. So the victim dies in exactly the
state that was read, and the phase recorded is where the kill landed, not where it was aimed.
The seed fixes the targets, victims and delays; the instants depend on scheduling, so a replay aims
at the same phases rather than the same microsecond.

After each kill torchrun must exit by itself, and within a few seconds no process of the run may
remain: a writer a worker forked dies with it, so one still alive (a child stuck inside the fork,
single-threaded and reparented to init, say) is a violation, recorded with its pid, state and
kernel wait channel, then killed. Then the run dir must show no torn snapshot
(every `step_*` dir holds its manifest and exactly the files it lists), `dtrain ckpt verify` must
pass, `ckpt list` must list those snapshots, and `latest` must name one. The next launch must
remove any temp file the kill left in `snapshots/` (a `latest` update cut short) before it trains,
and resume from the newest committed snapshot R and replay few steps:

    replayed = L - R <= 2k     L: the last step the killed launch finished (metrics.jsonl, one row a step)
                               k: snapshot.every_steps

The bound: the save of step s (a multiple of k) is staged at the end of step s and committed in
the background while training goes on, and the save of s + k first waits for it to finish. When
step L finishes, the save of every multiple of k below L has therefore started, and every one
but the newest has committed: R >= (the largest multiple of k below L) - k >= L - 2k. That is one
snapshot interval, plus the steps that run while one save is in flight (at most k).
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos import phases
from chaos.launch import LEFTOVER_GRACE, Launch, LaunchError, Settings, cli, committed_steps, last_step, leftovers
from dtrain.errors import DTrainError
from dtrain.snapshot import layout
from support.procs import freeze, kill, kill_tree, thaw, worker_ranks

EVERY = 3
_CHAIN = ("train.steps=1000000", f"snapshot.every_steps={EVERY}", "snapshot.keep_last=2", "snapshot.keep_best=0",
          "snapshot.keep_every=0", "train.log_every_steps=1")
SETTINGS = Settings((*_CHAIN, "snapshot.file_mb=4", "task.options.hidden=768"))
"""Frequent saves and a retention delete after each commit; a 14.6 MB snapshot in six files of
about 2.4 MB spread over both ranks, plus one small file per rank, so both ranks write for a while."""
TIED_SETTINGS = Settings((*_CHAIN, "snapshot.file_mb=1", "task.options.vocab=2048", "task.options.d_model=136",
                          "task.options.seq_len=8", "task.options.n_layer=1", "data.num_workers=2",
                          "train.micro_batch_size=6", 'train.precision="fp16"', "train.grad_clip_norm=1.0"),
                         config="examples/tied.toml")
"""The tied-embedding language model: a 1.06 MiB embedding under two names (the head is tied to
it) and a buffer that views the position table; about 10 MB in 1 MiB files, so the embedding and
its Adam moments are each split over two files, which the ranks write separately. It trains the way
large models do: DataLoader workers reading ahead, micro-batches, fp16 with a gradient scaler, clipping."""
WORKLOADS = {"teacher": SETTINGS, "tied": TIED_SETTINGS}
"""What the trials train, in turn (trial i: the (i mod n)-th workload asked for)."""
STAGINGS = ("copy", "fork")
"""How the trials stage their saves (`snapshot.staging`), in turn: one mode for a round of workloads."""

TARGETS = ("random", *phases.PHASES[1:])
"""What a trial aims at: a random moment, or the first sight of one save phase."""

_POLL = 0.001
_TARGET_TIMEOUT = 30.0  # then kill wherever the run is: a missed window is still a random kill
_EXIT_TIMEOUT = 120.0


@dataclass
class Trial:
    index: int
    target: str
    victim_rank: int
    workload: str
    """Which of WORKLOADS this trial trained."""
    staging: str
    """Its `snapshot.staging`, one of STAGINGS."""
    phase: str = ""
    state: str = ""
    last_step: int = 0
    newest: int = 0
    """The newest committed snapshot after the kill (0: none; a restart begins at step 0)."""
    resumed: int | None = None
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    litter: list[str] = field(default_factory=list)
    """Temp files the kill left in `snapshots/` itself; the next start must remove them."""
    seconds: float = 0.0

    @property
    def replayed(self) -> int | None:
        return None if self.resumed is None else self.last_step - self.resumed


@dataclass
class CrashReport:
    seed: int
    trials: list[Trial]
    seconds: float
    bound: int = 2 * EVERY

    @property
    def violations(self) -> list[str]:
        return [f"trial {t.index} ({t.workload}, {t.staging}, {t.target} -> {t.phase}): {v}" for t in self.trials
                for v in t.violations]

    def litter(self) -> list[str]:
        """Every temp file a kill left in `snapshots/` (a restart that kept one is a violation)."""
        return sorted({name for t in self.trials for name in t.litter})

    def by_phase(self) -> dict[str, list[Trial]]:
        return {p: [t for t in self.trials if t.phase == p] for p in phases.PHASES}

    def to_json(self) -> dict[str, Any]:
        replayed = [t.replayed for t in self.trials if t.replayed is not None]
        return {"seed": self.seed, "trials": len(self.trials), "seconds": round(self.seconds, 1),
                "bound": self.bound, "violations": self.violations, "litter": self.litter(),
                "workloads": {w: sum(t.workload == w for t in self.trials) for w in WORKLOADS},
                "stagings": {m: sum(t.staging == m for t in self.trials) for m in STAGINGS},
                "phases": {p: len(ts) for p, ts in self.by_phase().items()},
                "replayed_max": max(replayed, default=None),
                "replayed_median": statistics.median(replayed) if replayed else None,
                "per_trial": [asdict(t) for t in self.trials]}


class CrashHarness:
    """Runs `trials` kill-and-restart trials, seeded by `seed`, the `workloads` in turn, each on
    `root/WORKLOAD/run`, and the `stagings` in turn, a round of workloads each."""

    def __init__(self, root: Path, seed: int, trials: int, say: Callable[[str], None] = print,
                 workloads: tuple[str, ...] = tuple(WORKLOADS), stagings: tuple[str, ...] = STAGINGS) -> None:
        for kind, asked, known in (("workload", workloads, tuple(WORKLOADS)), ("staging", stagings, STAGINGS)):
            if not asked or set(asked) - set(known):
                raise ValueError(f"{kind}s {asked!r}: choose one or more of {', '.join(known)}")
        self.root, self.seed, self.say = root, seed, say
        self.workloads, self.stagings = workloads, stagings
        self.rng = random.Random(seed)
        self.targets = plan_targets(self.rng, trials)
        self.shards: dict[str, int] | None = None
        self.start = 0

    def run_dir(self, workload: str) -> Path:
        return self.root / workload / "run"

    def plan(self, index: int) -> tuple[str, str]:
        """The workload and the staging mode of trial `index`: every pair once in each round."""
        rounds, turn = divmod(index, len(self.workloads))
        return self.workloads[turn], self.stagings[rounds % len(self.stagings)]

    def run(self) -> CrashReport:
        self.say(f"crash harness: {len(self.targets)} trials, seed {self.seed} (replay with this seed), "
                 f"workloads {', '.join(self.workloads)} and staging {', '.join(self.stagings)} in turn, "
                 f"run dirs {self.root}/WORKLOAD/run")
        started, trials = time.monotonic(), []
        last: dict[str, Trial] = {}  # each workload's newest trial: what its next launch resumes from
        workload = self.workloads[0]
        try:
            for index, target in enumerate(self.targets):
                workload, staging = self.plan(index)
                run_dir = self.run_dir(workload)
                log = self.root / workload / f"launch-{index:03d}.log"
                args = WORKLOADS[workload].train_args(run_dir, f'snapshot.staging="{staging}"')
                with _launched(Launch(run_dir, args, log)) as launch:
                    start = self._check_resume(launch, last.get(workload))
                    last[workload] = self._trial(index, workload, staging, target, launch, start)
                    trials.append(last[workload])
            for workload, trial in last.items():
                self._final_launch(workload, trial)
        except LaunchError as e:  # a restart that fails ends the chains: its run dir is what failed
            if workload not in last:
                raise
            last[workload].violations.append(f"the restart failed: {e}")
            self.say(_line(last[workload]))
        return CrashReport(self.seed, trials, time.monotonic() - started)

    # -- one trial ----------------------------------------------------------------------------

    def _trial(self, index: int, workload: str, staging: str, target: str, launch: Launch, start: int) -> Trial:
        began = time.monotonic()
        ranks = worker_ranks(launch.pid, 2)
        victim = 0 if target in phases.RANK0_ONLY else self.rng.choice(sorted(ranks))
        trial = Trial(index, target, victim, workload, staging, last_step=start)
        self.shards, self.start = None, start  # a resumed run may lay its files out anew: learn them again
        self._strike(launch, ranks, trial)
        code = launch.await_exit(_EXIT_TIMEOUT)
        if not trial.phase:
            trial.violations.append(f"torchrun exited {code} before the kill:\n{launch.tail()}")
        elif code is None:
            trial.violations.append(f"torchrun did not exit within {_EXIT_TIMEOUT:g}s of the kill")
        elif code == 0:
            trial.violations.append("torchrun exited 0 after a worker was SIGKILLed")
        trial.violations += outlived(launch)
        trial.last_step = last_step(launch.metrics()) or trial.last_step
        trial.violations += check_run_dir(launch.run_dir)
        trial.litter = litter(launch.run_dir)
        committed = committed_steps(launch.run_dir)
        trial.newest = committed[-1] if committed else 0
        trial.seconds = time.monotonic() - began
        return trial

    def _strike(self, launch: Launch, ranks: dict[int, int], trial: Trial) -> None:
        """Kill at a random moment, or at the first moment the frozen workers show the target phase."""
        if trial.target == "random":
            time.sleep(self.rng.uniform(0.0, 3.0))
            self._kill(launch, ranks, trial, None)
            return
        delay = self.rng.uniform(0.0, 0.05) if trial.target == phases.WRITE else 0.0  # anywhere in the write
        deadline = time.monotonic() + _TARGET_TIMEOUT
        while time.monotonic() < deadline and launch.proc.poll() is None:
            if self._phase_now(launch) == trial.target:
                time.sleep(delay)
                if self._kill(launch, ranks, trial, trial.target):
                    return
            time.sleep(_POLL)
        if launch.proc.poll() is None:
            trial.notes.append(f"{trial.target} not caught within {_TARGET_TIMEOUT:g}s; killed where the run was")
            self._kill(launch, ranks, trial, None)

    def _kill(self, launch: Launch, ranks: dict[int, int], trial: Trial, only_in: str | None) -> bool:
        """Freeze both workers and read where they are; SIGKILL the victim there, unless that is not
        `only_in` (a poll saw the phase, but it passed before the freeze): then let both go on."""
        pids = [ranks[r] for r in sorted(ranks)]
        freeze(pids)
        killed = False
        try:
            state = phases.observe(launch.run_dir, launch.watch)
            phase = phases.classify(state, self._shard_sizes(launch.run_dir))
            known = self.shards is not None or only_in not in (phases.WRITE, phases.SHARDS)
            if only_in is None or (phase == only_in and known):  # a full write reads as `write` until then
                trial.phase, trial.state = phase, phases.describe(state)
                killed = kill(ranks[trial.victim_rank], signal.SIGKILL)
        finally:
            thaw([p for r, p in ranks.items() if not (killed and r == trial.victim_rank)])
        return killed

    def _phase_now(self, launch: Launch) -> str:
        return phases.classify(phases.observe(launch.run_dir, launch.watch), self._shard_sizes(launch.run_dir))

    def _shard_sizes(self, run_dir: Path) -> dict[str, int] | None:
        """Shard sizes from the first snapshot this launch committed (None before it has one)."""
        if self.shards is None:
            mine = [s for s in committed_steps(run_dir) if s > self.start]
            self.shards = phases.shard_sizes(run_dir, mine[0]) if mine else None
        return self.shards

    # -- the restart ----------------------------------------------------------------------------

    def _check_resume(self, launch: Launch, previous: Trial | None) -> int:
        """The step training starts at; after a kill, the newest committed one, with <= 2k replayed."""
        resumed = launch.await_start() or 0
        if previous is None:
            return resumed
        previous.resumed = resumed
        if resumed != previous.newest:
            previous.violations.append(f"resumed from step {resumed}, the newest committed snapshot "
                                       f"is step {previous.newest}")
        if previous.replayed is not None and previous.replayed > 2 * EVERY:
            previous.violations.append(f"replayed {previous.replayed} steps (last step {previous.last_step}, "
                                       f"resumed {resumed}) > 2 * every_steps = {2 * EVERY}")
        if "falling back" in launch.watch.text():
            previous.violations.append("a committed snapshot failed verification on resume")
        kept = sorted(set(previous.litter) & set(litter(launch.run_dir)))  # this launch's own have other pids
        if kept:
            previous.violations.append(f"the restart left the kill's temp file(s) in snapshots/: {', '.join(kept)}")
        self.say(_line(previous))
        return resumed

    def _final_launch(self, workload: str, previous: Trial) -> None:
        """A last restart trains a few steps and finishes: the run goes on after every kill."""
        steps = previous.newest + EVERY
        run_dir = self.run_dir(workload)
        args = WORKLOADS[workload].train_args(run_dir, f"train.steps={steps}", f'snapshot.staging="{previous.staging}"')
        with _launched(Launch(run_dir, args, self.root / workload / "launch-final.log")) as launch:
            self._check_resume(launch, previous)
            code = launch.await_exit(_EXIT_TIMEOUT)
            left = outlived(launch)
        if code != 0:
            previous.violations.append(f"the final restart exited {code}:\n{launch.tail()}")
        previous.violations += left + check_run_dir(run_dir)
        self.say(f"  final restart ({workload}): resumed from step {previous.resumed}, finished at step {steps} "
                 f"(exit {code})")


@contextlib.contextmanager
def _launched(launch: Launch) -> Iterator[Launch]:
    """A launch whose every process is gone when the block ends, however it ends: its tree, and
    any process of its run dir that left the tree (one the trial already recorded, or missed)."""
    try:
        yield launch
    finally:
        if launch.proc.poll() is None:
            kill_tree(launch.pid)
            launch.proc.wait()
        for p in leftovers(launch.run_dir):
            kill(p.pid, signal.SIGKILL)


def outlived(launch: Launch) -> list[str]:
    """Once torchrun has exited: a violation for each process of its run still alive a few seconds
    later (each killed once recorded)."""
    return [f"a process outlived its run by {LEFTOVER_GRACE:g}s: {p}" for p in launch.leftovers()]


def plan_targets(rng: random.Random, trials: int) -> list[str]:
    """Every target once per round, in a seeded order, so a dozen trials already cover each phase."""
    plan: list[str] = []
    while len(plan) < trials:
        plan += rng.sample(TARGETS, len(TARGETS))
    return plan[:trials]


def check_run_dir(run_dir: Path) -> list[str]:
    """What a crash may never leave: a torn or unverifiable snapshot, or a `latest` naming none."""
    problems = []
    snaps = run_dir / layout.SNAPSHOTS
    dirs = sorted(p for p in snaps.iterdir() if layout.parse_step_dir(p.name) is not None) if snaps.is_dir() else []
    for d in dirs:
        problems += _torn(d)
    committed = committed_steps(run_dir)
    if committed:
        code, out, err = cli("ckpt", "verify", str(run_dir))
        if code != 0:
            problems.append(f"dtrain ckpt verify exited {code}:\n{out}{err}")
    code, out, err = cli("ckpt", "list", str(run_dir), "--json")
    listed = [row["step"] for row in json.loads(out)] if code == 0 else err
    if listed != committed:
        problems.append(f"dtrain ckpt list shows {listed}, the committed snapshots are {committed}")
    latest = (snaps / "latest").read_text().strip() if (snaps / "latest").exists() else None
    if latest is not None and layout.parse_step_dir(latest) not in committed:
        problems.append(f"snapshots/latest names {latest!r}, which is not a committed snapshot")
    return problems


def litter(run_dir: Path) -> list[str]:
    """Hidden files in `snapshots/` other than `.pending/`: a kill inside `latest`'s atomic replace
    leaves its temp file there, for the next start to remove."""
    snaps = run_dir / layout.SNAPSHOTS
    return sorted(p.name for p in snaps.iterdir() if p.name.startswith(".") and p.name != ".pending") \
        if snaps.is_dir() else []


def _torn(snapshot: Path) -> list[str]:
    manifest = snapshot / layout.MANIFEST
    if not manifest.exists():
        return [f"{snapshot.name} is visible without a manifest (a torn snapshot)"]
    try:
        listed = set(phases.manifest_files(snapshot))
    except DTrainError as e:
        return [f"{snapshot.name}: its manifest does not read back: {e}"]
    present = {p.name for p in snapshot.iterdir()} - {layout.MANIFEST}
    if listed != present:
        return [f"{snapshot.name}: files {sorted(present)} on disk, the manifest lists {sorted(listed)}"]
    return []


def _line(t: Trial) -> str:
    extra = "".join(f"\n    ! {v}" for v in t.violations) + "".join(f"\n    note: {n}" for n in t.notes)
    return (f"  trial {t.index:3d}  {t.workload:<7} {t.staging:<4}  target {t.target:<16} landed {t.phase:<16} "
            f"rank {t.victim_rank}  last step {t.last_step:4d}  resumed {t.resumed!s:>4}  "
            f"replayed {t.replayed!s:>2}  {t.seconds:5.1f}s{extra}")
