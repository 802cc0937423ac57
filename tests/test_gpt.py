"""The GPT example: a tied head that survives a snapshot, deterministic data from the pydoc text,
AdamW groups, the LR schedule, a falling loss, and `examples/generate.py` on an exported model."""

from __future__ import annotations

import importlib.util
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtrain
from dtrain.examples import gpt
from tests.conftest import REPO, dtrain_cmd, run

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "num_samples": 512, "eval_samples": 32,
        "warmup_steps": 4, "total_steps": 20, "lr": 3e-3, "min_lr": 3e-4}


def built(options: dict = TINY) -> tuple[gpt.GPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = gpt.build_model(options)
    optimizer = gpt.build_optimizer(model.parameters(), options)
    return model, optimizer, gpt.build_scheduler(optimizer, options)


def train(model: gpt.GPT, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> list[float]:
    data, _ = gpt.build_datasets(TINY)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        inputs, targets = data.__getitems__(torch.randint(len(data), (16,), generator=g).tolist())
        loss = gpt.per_sample_loss(model(inputs), targets).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_head_is_tied_and_stays_tied_through_a_snapshot(tmp_path: Path) -> None:
    model, optimizer, scheduler = built()
    assert model.head.weight is model.tok_emb.weight
    train(model, optimizer, scheduler, 3)
    snap = dtrain.Snapshotter(tmp_path / "run", every_steps=1)
    snap.close(3, {"model": model, "optimizer": optimizer, "scheduler": scheduler})

    fresh, fresh_opt, fresh_sched = built({**TINY, "lr": 1.0})  # other values everywhere, to be overwritten
    state = {"model": fresh, "optimizer": fresh_opt, "scheduler": fresh_sched}
    restorer = dtrain.Snapshotter(tmp_path / "run", every_steps=1)
    assert restorer.restore(state) == 3
    restorer.close(3, state)
    assert fresh.head.weight is fresh.tok_emb.weight
    for (name, saved), restored in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(saved, restored), name
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    with torch.no_grad():  # one storage: a change through the embedding is seen by the head
        fresh.tok_emb.weight[0, 0] = 123.0
    assert fresh.head.weight[0, 0].item() == 123.0


def test_dataset_is_the_pydoc_text_deterministic_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydoc_data.topics import topics

    def no_network(*args: object) -> None:
        raise AssertionError("the GPT dataset opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    text = gpt.corpus()
    assert len(text) > 400_000 and topics["with"].encode() in text
    (train_a, eval_a), (train_b, eval_b) = gpt.build_datasets(TINY), gpt.build_datasets(TINY)
    ids = [0, 7, 31, 3]
    for a, b in zip(train_a.__getitems__(ids) + eval_a.__getitems__(ids), train_b.__getitems__(ids) + eval_b.__getitems__(ids),
                    strict=True):
        assert torch.equal(a, b)
    inputs, targets = train_a.__getitems__([5])
    assert inputs.shape == (1, 16) and torch.equal(inputs[0, 1:], targets[0, :-1])  # targets shifted by one
    assert gpt.decode(torch.cat([inputs[0], targets[0, -1:]])).encode() == text[5 * 16:5 * 16 + 17]
    assert len(train_a) == 512 and len(eval_a) == 32
    held_out = text[int(len(text) * 0.9):]
    first_eval = gpt.decode(torch.cat([eval_a[0][0], eval_a[0][1][-1:]])).encode()
    assert held_out.startswith(first_eval) and first_eval not in text[:int(len(text) * 0.9)]
    assert torch.equal(train_a[5][0], inputs[0])


def test_optimizer_decays_matrices_only_and_counts_the_tied_weight_once() -> None:
    model, optimizer, _ = built()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    every = decay["params"] + no_decay["params"]
    assert len({id(p) for p in every}) == len(every) == len(list(model.parameters()))
    assert sum(p is model.tok_emb.weight for p in decay["params"]) == 1
    again = gpt.build_optimizer([model.tok_emb.weight, model.head.weight, model.ln_f.weight], TINY)
    assert [len(g["params"]) for g in again.param_groups] == [1, 1]


def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    _, optimizer, scheduler = built()
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak, floor = TINY["lr"], TINY["min_lr"]
    assert lrs[:4] == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[12] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert all(a > b for a, b in zip(lrs[4:20], lrs[5:21], strict=True))
    assert lrs[20:] == pytest.approx([floor] * 10)
    assert set(scheduler.state_dict()["lr_lambdas"]) == {None}  # a plain state dict: no pickled function


def test_a_few_steps_lower_the_loss() -> None:
    losses = train(*built(), 20)
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # uniform over the bytes at init
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


@pytest.mark.timeout(120)
def test_generate_script_runs_on_an_exported_model(tmp_path: Path) -> None:
    config = tmp_path / "gpt.toml"
    config.write_text((REPO / "examples" / "gpt.toml").read_text())
    run_dir = tmp_path / "run"
    settings = ["--set", "train.steps=2", "--set", "train.global_batch_size=4", "--set", "train.precision='fp32'"]
    settings += [f"--set=task.options.{k}={v}" for k, v in TINY.items()]
    done = run(dtrain_cmd("train", "--config", str(config), "--run-dir", str(run_dir), *settings), timeout=90)
    assert done.returncode == 0, done.stdout[-3000:]
    weights = tmp_path / "gpt.safetensors"
    done = run(dtrain_cmd("ckpt", "export", str(run_dir), "--out", str(weights)))
    assert done.returncode == 0, done.stdout
    script = [str(REPO / "examples" / "generate.py"), str(weights), "--run-dir", str(run_dir), "--tokens", "20"]
    done = run([dtrain_cmd()[0], *script, "--prompt", "The with"], timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.startswith("The with") and len(done.stdout.rstrip("\n").encode()) >= len("The with") + 10


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the script would run")
def test_gpu_check_says_no_cuda_device_and_exits_2() -> None:
    done = subprocess.run([str(REPO / "launch" / "ci" / "gpu-check.sh")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "no CUDA device" in done.stderr, done.stderr


@pytest.mark.soak
@pytest.mark.timeout(400)
def test_gpu_check_logic_on_the_cpu(tmp_path: Path) -> None:
    """The CUDA check's own logic, dry on the CPU: kill and resume (export bit-identical), device moves."""
    done = run([sys.executable, str(REPO / "launch" / "ci" / "gpu_check.py"), "--device", "cpu", "--quick",
                "--work", str(tmp_path / "work")], timeout=380)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "export bit-identical" in done.stdout and "every tensor bit-identical" in done.stdout


def test_gpu_check_names_a_state_mismatch() -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "ci" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    saved = check.build("cpu", TINY)
    check.compare(check.build("cpu", TINY), saved, "same")
    changed = check.build("cpu", TINY)
    with torch.no_grad():
        changed["model"].blocks[0].fc.bias[3] += 1e-6
    with pytest.raises(check.CheckFailed, match=r"STATE MISMATCH.*blocks\.0\.fc\.bias"):
        check.compare(changed, saved, "changed")
