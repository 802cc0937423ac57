"""`dtrain ckpt` on a run dir: retention applied by hand, the best model exported past a corrupt manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtrain.dist import solo_context
from dtrain.snapshot import catalog, layout
from dtrain.snapshot.messages import SnapshotMeta
from dtrain.snapshot.writer import SnapshotWriter
from dtrain.storage import LocalStorage
from tests.conftest import REPO, dtrain_cmd, run

LOSSES = {10: 0.9, 20: 0.4, 30: 0.6, 40: 0.7}  # the best is step 20


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Four committed snapshots whose model weights are their step, with a val_loss each; no retention ran."""
    storage = LocalStorage(tmp_path / "run")
    writer = SnapshotWriter(storage, solo_context())
    config = {"snapshot": {"keep_last": 2, "keep_best": 1, "best_metric": "val_loss", "best_mode": "min"}}
    for step, loss in LOSSES.items():
        model = {"w": torch.full((4,), float(step))}
        writer.save(step, {"model": model}, {}, SnapshotMeta(metrics={"val_loss": loss}, config=config)).wait()
    return tmp_path / "run"


def test_prune_applies_the_runs_own_retention(run_dir: Path) -> None:
    done = run(dtrain_cmd("ckpt", "prune", str(run_dir)), timeout=120)
    assert done.returncode == 0, done.stdout
    assert catalog.committed_steps(LocalStorage(run_dir)) == [20, 30, 40]  # the newest two and the best


def test_prune_is_refused_while_a_job_holds_the_run_dir(run_dir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from dtrain.runlock import RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(run_dir)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run(dtrain_cmd("ckpt", "prune", str(run_dir)), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2 and f"pid {holder.pid}" in done.stdout, done.stdout
    assert catalog.committed_steps(LocalStorage(run_dir)) == list(LOSSES)  # nothing deleted


@pytest.mark.parametrize("corrupt, exported", [(None, 20), (30, 20), (20, 30)],
                         ids=["intact", "another-corrupt", "the-best-corrupt"])
def test_export_best_survives_a_corrupt_manifest(run_dir: Path, tmp_path: Path, corrupt: int | None,
                                                 exported: int) -> None:
    if corrupt is not None:
        manifest = run_dir / layout.committed_path(corrupt) / layout.MANIFEST
        manifest.write_bytes(manifest.read_bytes().replace(b'"val_loss"', b'"val_lose"'))
    out = tmp_path / "best.safetensors"
    done = run(dtrain_cmd("ckpt", "export", str(run_dir), "--best", "--out", str(out)), timeout=120)
    assert done.returncode == 0, done.stdout
    assert f"exported step {exported}" in done.stdout
    assert torch.equal(load_file(str(out))["w"], torch.full((4,), float(exported)))
    if corrupt is not None:
        assert "checksum mismatch" in done.stdout  # the corrupt one is named, not silently skipped
