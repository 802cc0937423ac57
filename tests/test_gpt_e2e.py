"""The GPT example (examples/gpt.toml: bf16, clipping, tied head, dropout) under torchrun, a worker
SIGKILLed at a seeded random step after the first commit and restarted by torchrun: the run ends
bit for bit where the uninterrupted run ends, and the exported head is still the embedding."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from chaos.launch import committed_steps, last_step, read_metrics
from support.procs import kill, kill_tree, wait_for, worker_ranks
from tests.conftest import REPO, export_weights, run, torchrun_cmd

STEPS = 30
SMALL = ["--set", f"train.steps={STEPS}", "--set", "snapshot.every_steps=5", "--set", "train.log_every_steps=1",
         "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=4",
         "--set", "task.options.n_layer=1", "--set", "task.options.n_embd=32", "--set", "task.options.n_head=2",
         "--set", "task.options.block_size=32", "--set", "task.options.dropout=0.1",
         "--set", "task.options.eval_samples=64", "--set", f"task.options.total_steps={STEPS}",
         "--set", "snapshot.keep_best=0"]
"""The example's recipe (bf16, clipping at 1.0, warm-up and cosine) on a smaller GPT, with dropout on so
the restored generators matter, and micro-batches so accumulation is resumed too."""


def _args(run_dir: Path) -> list[str]:
    return ["train", "--config", "examples/gpt.toml", "--run-dir", str(run_dir), *SMALL]


@pytest.mark.parametrize("seed", [7])
def test_gpt_killed_and_resumed_is_bit_identical(tmp_path: Path, seed: int) -> None:
    reference_dir, run_dir = tmp_path / "reference" / "run", tmp_path / "killed" / "run"
    done = run(torchrun_cmd(2, *_args(reference_dir)))
    assert done.returncode == 0, done.stdout[-3000:]
    reference = export_weights(reference_dir)

    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    log = run_dir.parent / "torchrun.log"
    with log.open("w") as out:
        agent = subprocess.Popen(torchrun_cmd(2, *_args(run_dir), max_restarts=1), cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ranks = worker_ranks(agent.pid, 2)
        first = wait_for(lambda: committed_steps(run_dir), 180, "the first committed snapshot")[0]
        at, victim = rng.randint(first + 1, STEPS - 5), rng.randrange(2)
        wait_for(lambda: (last_step(read_metrics(run_dir)) or 0) >= at or agent.poll() is not None, 180,
                 f"step {at}", interval=0.005)
        assert agent.poll() is None, "the run ended before the kill"
        assert kill(ranks[victim], signal.SIGKILL)
        code = agent.wait(timeout=300)
    finally:
        kill_tree(agent.pid)
    out = log.read_text()
    assert code == 0, f"torchrun exited {code} after rank {victim} was SIGKILLed at step {at}:\n{out[-4000:]}"
    assert re.search(r"resumed from snapshot step \d+", out), out[-3000:]

    final = export_weights(run_dir)
    assert final == reference, "the resumed GPT ended elsewhere than the uninterrupted one"
    weights = load_safetensors(final)
    head = [k for k in weights if k.endswith("head.weight")]
    emb = [k for k in weights if k.endswith("tok_emb.weight")]
    assert head and emb and weights[head[0]].equal(weights[emb[0]]), "the exported head is not the embedding"
