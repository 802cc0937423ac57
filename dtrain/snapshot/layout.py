"""Names on disk inside a run dir. Steps are zero-padded so lexical order is numeric order.

    RUN_DIR/
      .lock                             flock held by rank 0 for the run (dtrain.runlock)
      metrics.jsonl                     one JSON object per line, appended by rank 0
      snapshots/
        latest                          name of the newest committed snapshot (a convenience)
        step_000000150/                 a committed snapshot
          manifest.json                 written last, by rank 0: what makes the files a snapshot
          replicated-00000.bin          model/optimizer bytes, spread over the writing ranks
          shard-00001-00000.bin         rank 1's rows of sharded (FSDP) tensors
          rank-00001.bin                per-rank state of rank 1 (its RNG)
        .pending/                       in-flight and abandoned saves; never read, cleaned on start
        .latest.tmp-<pid>-<hex>         a `latest` update a kill interrupted; removed on start
"""

from __future__ import annotations

import re

SNAPSHOTS = "snapshots"
PENDING = f"{SNAPSHOTS}/.pending"
LATEST = f"{SNAPSHOTS}/latest"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"

_STEP_DIR = re.compile(r"^step_(\d{9,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def committed_path(step: int) -> str:
    return f"{SNAPSHOTS}/{step_dir_name(step)}"


def pending_path(step: int, nonce: str) -> str:
    return f"{PENDING}/{step_dir_name(step)}.{nonce}"


def replicated_file(index: int) -> str:
    return f"replicated-{index:05d}.bin"


def shard_file(rank: int, index: int) -> str:
    return f"shard-{rank:05d}-{index:05d}.bin"


def per_rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.bin"


def per_rank_prefix(rank: int) -> str:
    """The key prefix of one rank's own state (its RNG streams) among a snapshot's tensors."""
    return f"rank{rank:05d}"
