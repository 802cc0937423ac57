"""The S3 crash harness (`python -m chaos.run --only s3crash`): SIGKILL in every phase of a save to a
bucket, no torn snapshot, leftovers cleaned at the next start. Five trials, one per target."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos import s3crash


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_kills_in_every_phase_of_a_save_to_a_bucket(tmp_path: Path) -> None:
    trials = s3crash.S3CrashHarness(tmp_path, seed=16, trials=len(s3crash.TARGETS)).run()
    assert [t.target for t in trials] == list(s3crash.TARGETS)
    assert not s3crash.summary(trials)["violations"], s3crash.table(trials)
    assert sum(t.seen == t.target for t in trials) >= 4, s3crash.table(trials)  # phases were sighted, not missed
