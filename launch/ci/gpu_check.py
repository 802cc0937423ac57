"""The checks of `launch/ci/gpu-check.sh`: the GPT example on one device, killed and resumed, and
snapshots moved between the CPU and the device. Exit 0 when every check passes, 1 naming the first
mismatch. `--device cpu` runs the same logic without a GPU (a dry run of the CUDA path).

    python launch/ci/gpu_check.py --device cuda --work /tmp/gpu-check
    python launch/ci/gpu_check.py --device cpu --work /tmp/gpu-check-dry --quick

1. resume: `torchrun --nproc_per_node 1` trains `examples/gpt.toml` (bf16, gradient clipping, nccl
   on CUDA) without interruption; a second run of the same config is SIGKILLed (the whole process
   group) once a snapshot past a third of the run is committed, then the same command resumes it;
   `dtrain ckpt export` of both must be the same bytes.
2. devices: the GPT's model, optimizer and scheduler trained a few steps on the CPU and saved are
   restored onto the device, compared bit for bit (the head still tied), trained on, saved there
   and restored onto the CPU, compared again; and the CLI trains a run on the CPU, resumes it on
   the device, then on the CPU again, `ckpt verify` clean.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import dtrain  # noqa: E402
from dtrain.examples import gpt  # noqa: E402
from support.procs import kill_tree  # noqa: E402

# On a GPU: a model worth the name that still runs in well under a minute; on the CPU: tiny.
SIZES = {
    "cuda": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128},
    "cpu": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
}


class CheckFailed(Exception):
    pass


def settings(device: str, steps: int, every: int) -> list[str]:
    """`--set` arguments: the device, its backend, the run length, and deterministic kernels."""
    pairs = {"train.device": f"'{device}'", "dist.backend": "'nccl'" if device == "cuda" else "'gloo'",
             "train.steps": steps, "train.log_every_steps": max(1, steps // 10), "snapshot.every_steps": every,
             "snapshot.keep_last": 2, "task.options.total_steps": steps, "task.options.deterministic": "true"}
    pairs.update({f"task.options.{k}": v for k, v in SIZES[device].items()})
    return [f"--set={k}={v}" for k, v in pairs.items()]


def train_cmd(run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "dtrain",
            "train", "--config", str(REPO / "examples" / "gpt.toml"), "--run-dir", str(run_dir), *extra]


def env() -> dict[str, str]:
    # cuBLAS is deterministic only with a fixed workspace; set before any CUDA work in the worker.
    return {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def train(run_dir: Path, extra: list[str], log: Path, timeout: float = 300) -> str:
    with log.open("a") as out:
        done = subprocess.run(train_cmd(run_dir, extra), stdout=out, stderr=subprocess.STDOUT, env=env(),
                              cwd=REPO, timeout=timeout, start_new_session=True)
    text = log.read_text()
    if done.returncode != 0:
        raise CheckFailed(f"training {run_dir} exited {done.returncode}; its log, {log}, ends:\n{text[-3000:]}")
    return text


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "snapshots" / "latest").read_text().strip().rsplit("_", 1)[1])
    except (OSError, ValueError, IndexError):
        return 0


def train_and_kill(run_dir: Path, extra: list[str], log: Path, kill_after: int, timeout: float = 300) -> int:
    """Start training; once a snapshot past `kill_after` is committed, SIGKILL torchrun and its workers
    (which run in sessions of their own), as a lost node would be."""
    with log.open("a") as out:
        proc = subprocess.Popen(train_cmd(run_dir, extra), stdout=out, stderr=subprocess.STDOUT, env=env(),
                                cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + timeout
    while latest_step(run_dir) < kill_after:
        if proc.poll() is not None:
            raise CheckFailed(f"the run to kill ended (exit {proc.returncode}) before a snapshot past step "
                              f"{kill_after}; make the run longer. Log {log}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise CheckFailed(f"no snapshot past step {kill_after} within {timeout}s; log {log}")
        time.sleep(0.02)
    kill_tree(proc.pid)
    if proc.wait() != -signal.SIGKILL:
        raise CheckFailed(f"torchrun exited {proc.returncode} before the SIGKILL reached it; log {log}")
    return latest_step(run_dir)


def export(run_dir: Path) -> bytes:
    out = run_dir.with_suffix(".safetensors")
    done = subprocess.run([sys.executable, "-m", "dtrain", "ckpt", "export", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise CheckFailed(f"export of {run_dir} failed: {done.stderr[-2000:]}")
    return out.read_bytes()


def check_resume(device: str, work: Path, steps: int, every: int) -> None:
    extra = settings(device, steps, every)
    whole, killed = work / "resume-whole", work / "resume-killed"
    train(whole, extra, work / "resume-whole.log")
    at = train_and_kill(killed, extra, work / "resume-killed.log", kill_after=steps // 3)
    if at >= steps:
        raise CheckFailed(f"the kill came after the last step ({at}); make the run longer")
    text = train(killed, extra, work / "resume-killed.log")
    if f"resumed from snapshot step {at}" not in text:
        raise CheckFailed(f"the second start did not resume from step {at}; log {work / 'resume-killed.log'}")
    a, b = export(whole), export(killed)
    if a != b:
        raise CheckFailed(f"EXPORT MISMATCH: the run SIGKILLed at step ~{at} and resumed does not export the same "
                          f"bytes as the uninterrupted run ({whole}.safetensors vs {killed}.safetensors)")
    print(f"ok  resume on {device}: SIGKILLed after the snapshot of step {at}, resumed to {steps}; "
          f"export bit-identical ({len(a)} bytes)", flush=True)


# -- moving snapshots between the CPU and the device ---------------------------------------------


def build(device: str, options: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = gpt.build_model(options).to(device)
    optimizer = gpt.build_optimizer(model.parameters(), options)
    return {"model": model, "optimizer": optimizer, "scheduler": gpt.build_scheduler(optimizer, options)}


def train_steps(state: dict[str, Any], options: dict[str, Any], steps: int, seed: int) -> None:
    model = state["model"]
    device = next(model.parameters()).device
    data, _ = gpt.build_datasets(options)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs, targets = (t.to(device) for t in data.__getitems__(torch.randint(len(data), (8,), generator=g).tolist()))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = gpt.per_sample_loss(model(inputs), targets).mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        state["scheduler"].step()


def flat(state: dict[str, Any]) -> dict[str, Any]:
    """Every tensor and number of the state, on the CPU, by a dotted name."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            out[prefix] = value.detach().cpu() if isinstance(value, torch.Tensor) else value

    for key, obj in state.items():
        walk(key, obj.state_dict())
    return out


def compare(restored: dict[str, Any], saved: dict[str, Any], what: str) -> None:
    a, b = flat(restored), flat(saved)
    if a.keys() != b.keys():
        raise CheckFailed(f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:10]}")
    for name in a:
        x, y = a[name], b[name]
        same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                and x.shape == y.shape and torch.equal(x, y)) or (not isinstance(x, torch.Tensor) and x == y)
        if not same:
            raise CheckFailed(f"STATE MISMATCH {what}: {name} differs after restore")
    model = restored["model"]
    if model.head.weight is not model.tok_emb.weight:
        raise CheckFailed(f"{what}: the restored head is no longer tied to the token embedding")


def save(state: dict[str, Any], run_dir: Path, step: int) -> None:
    dtrain.Snapshotter(run_dir, every_steps=1).close(step, state)


def restore(state: dict[str, Any], run_dir: Path, step: int, device: str) -> None:
    snap = dtrain.Snapshotter(run_dir, every_steps=1)
    got = snap.restore(state)
    snap.close(step, state)  # a save of this step was restored, so nothing new is written
    if got != step:
        raise CheckFailed(f"restore from {run_dir} gave step {got}, saved {step}")
    placed = {p.device.type for p in state["model"].parameters()}
    placed |= {t.device.type for s in state["optimizer"].state.values() for t in s.values() if t.ndim}
    if placed != {device}:
        raise CheckFailed(f"restored onto {device}, but tensors are on {sorted(placed)}")


def check_devices(device: str, work: Path, steps: int) -> None:
    options = {**SIZES[device], "num_samples": 2048, "eval_samples": 64}
    on_cpu = build("cpu", options)
    train_steps(on_cpu, options, 3, seed=1)
    save(on_cpu, work / "devices-cpu", 3)
    on_device = build(device, {**options, "lr": 0.5})  # other values everywhere until restored
    restore(on_device, work / "devices-cpu", 3, device)
    compare(on_device, on_cpu, f"a CPU snapshot restored onto {device}")
    train_steps(on_device, options, 3, seed=2)
    save(on_device, work / "devices-device", 6)
    back = build("cpu", {**options, "lr": 0.5})
    restore(back, work / "devices-device", 6, "cpu")
    compare(back, on_device, f"a {device} snapshot restored onto the CPU")
    print(f"ok  devices: CPU snapshot -> {device} -> CPU, every tensor bit-identical, head tied", flush=True)

    run_dir, log = work / "mixed", work / "mixed.log"
    for i, where in enumerate(["cpu", device, "cpu"], start=1):
        extra = settings(device, steps * i, steps) + [f"--set=train.device='{where}'",
                                                       "--set=dist.backend='nccl'" if where == "cuda" else
                                                       "--set=dist.backend='gloo'", f"--set=task.options.total_steps={3 * steps}"]
        train(run_dir, extra, log)
    done = subprocess.run([sys.executable, "-m", "dtrain", "ckpt", "verify", str(run_dir)], capture_output=True,
                          text=True, cwd=REPO)
    if done.returncode != 0 or latest_step(run_dir) != 3 * steps:
        raise CheckFailed(f"the CPU -> {device} -> CPU run: verify exit {done.returncode}, newest snapshot "
                          f"{latest_step(run_dir)} (expected {3 * steps}):\n{done.stdout}")
    print(f"ok  devices: a run trained on the CPU, resumed on {device}, then on the CPU: {3 * steps} steps, "
          "every snapshot verified", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--work", type=Path, required=True, help="a fresh directory for run dirs and logs")
    p.add_argument("--quick", action="store_true", help="shorter runs (for the CPU dry run)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=False)
    steps, every = (24, 4) if args.quick else (300, 25)
    started = time.monotonic()
    try:
        check_resume(args.device, args.work, steps, every)
        check_devices(args.device, args.work, max(4, steps // 10))
    except CheckFailed as e:
        print(f"gpu-check: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"ok  all checks on {args.device} in {time.monotonic() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
