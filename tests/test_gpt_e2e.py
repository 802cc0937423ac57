"""The GPT example (examples/gpt.toml: bf16, clipping, tied head, dropout) under torchrun, a worker
SIGKILLed at a seeded random step after the first commit and restarted by torchrun: the run ends
bit for bit where the uninterrupted run ends, and the exported head is still the embedding."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from tests.conftest import export_weights, run, sigkill_one_worker_mid_run, torchrun_cmd

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

    out = sigkill_one_worker_mid_run(torchrun_cmd(2, *_args(run_dir), max_restarts=1), run_dir, STEPS - 5,
                                     random.Random(seed))
    assert re.search(r"resumed from snapshot step \d+", out), out[-3000:]

    final = export_weights(run_dir)
    assert final == reference, "the resumed GPT ended elsewhere than the uninterrupted one"
    weights = load_safetensors(final)
    head = [k for k in weights if k.endswith("head.weight")]
    emb = [k for k in weights if k.endswith("tok_emb.weight")]
    assert head and emb and weights[head[0]].equal(weights[emb[0]]), "the exported head is not the embedding"
