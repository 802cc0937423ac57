"""The state zoo: what real training puts in a snapshot, rebuilt bit for bit from a seed.

`build_zoo(seed)` is the replicated state (identical on every rank), `build_per_rank(seed, rank)`
one rank's own state; `load_fresh` loads restored state into newly built objects; `zoo_ranks` is
what each spawned rank of the world-size-2 tests runs (module-level, so spawn can import it).
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from dtrain.snapshot.messages import SnapshotMeta

VOCAB, DIM = 4096, 64  # the tied embedding: 1 MiB of float32, hundreds of pages
FILE_BYTES = 1 << 18  # small shard files, so the larger tensors are cut over several files
BAD_OUTER, BAD_INNER = "zoo_bad_outer", "zoo_bad_inner"  # distinctive keys an error must name


class TiedLM(nn.Module):
    """GPT-2's layout in miniature: the output head is the embedding, and a buffer views a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        # 12 KiB in the middle of proj.weight: at least two whole pages however the storage is aligned.
        self.register_buffer("proj_rows", self.proj.weight.data[8:56])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.emb(ids))))


def _small_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _two_groups(net: nn.Module) -> list[dict[str, Any]]:
    return [{"params": list(net[0].parameters()), "lr": 1e-2, "weight_decay": 0.0},
            {"params": list(net[2].parameters()), "lr": 3e-3, "weight_decay": 0.1}]


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "adamw": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2),
    "adamw_foreach": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2, foreach=True),
    "adamw_capturable": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2, amsgrad=True, capturable=True),
    "adagrad": lambda net: torch.optim.Adagrad(net.parameters(), lr=1e-2, lr_decay=1e-3),
    "rmsprop": lambda net: torch.optim.RMSprop(net.parameters(), lr=1e-2, momentum=0.5, centered=True),
    "two_groups": lambda net: torch.optim.AdamW(_two_groups(net)),
}


def _scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(opt, [sched.LinearLR(opt, start_factor=0.1, total_iters=3),
                                    sched.CosineAnnealingLR(opt, T_max=7)], milestones=[3])


@contextmanager
def _one_thread() -> Iterator[None]:
    """Every process computes the same floats only if each reduces in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_zoo(seed: int) -> dict[str, Any]:
    """The replicated state of the zoo: the same bits in every process for the same seed."""
    with _one_thread():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model, model_opt = _trained_tied(g)
        optimizers, scheduler = _trained_optimizers(g)
        return {
            "model": model.state_dict(),
            "model_optimizer": model_opt.state_dict(),
            "optimizers": optimizers,
            "scheduler": scheduler.state_dict(),
            "scaler": _scaler_state(g),
            "views": _views(g),
            "dtypes": _dtypes(g),
            "leaves": _leaves(g),
        }


def build_per_rank(seed: int, rank: int) -> dict[str, Any]:
    """One rank's own state: its RNG streams, as a trainer holds them."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    numpy_rng = np.random.default_rng(seed * 1000 + rank)
    numpy_rng.random(3)
    return {"rng": {"torch": g.get_state(), "python": random.Random(seed + rank).getstate(),
                    "numpy": numpy_rng.bit_generator.state},  # PCG64: 128-bit ints
            "rank": rank, "noise": torch.randn(257, generator=g)}


def _trained_tied(g: torch.Generator) -> tuple[TiedLM, torch.optim.Optimizer]:
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), torch.randint(0, VOCAB, (32,), generator=g)).backward()
        opt.step()
    return model, opt


def _trained_optimizers(g: torch.Generator) -> tuple[dict[str, Any], Any]:
    x, y = torch.randn(24, 16, generator=g), torch.randn(24, 8, generator=g)
    states, scheduler = {}, None
    for name, make in OPTIMIZERS.items():
        net = _small_net()
        capturable = name == "adamw_capturable"
        # A CPU optimizer cannot step with capturable=True: step a plain one and set the flag,
        # which gives the state a capturable optimizer holds (0-dim float step tensors).
        opt = make(net) if not capturable else torch.optim.AdamW(net.parameters(), lr=1e-2, amsgrad=True)
        sched = _scheduler(opt) if name == "two_groups" else None
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()
        if capturable:
            opt.param_groups[0]["capturable"] = True
        states[name] = opt.state_dict()
        scheduler = sched or scheduler
    return states, scheduler


def _scaler_state(g: torch.Generator) -> dict[str, Any]:
    net = _small_net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    x = torch.randn(8, 16, generator=g)
    for i in range(5):
        opt.zero_grad()
        loss = net(x).square().mean()
        if i == 2:
            loss = loss * math.inf  # an overflow: the scaler backs off and skips the step
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return scaler.state_dict()


def _views(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors that are not each a whole storage of their own."""
    base = torch.randn(16384, generator=g)  # 64 KiB
    mat = torch.randn(96, 128, generator=g)
    return {
        "base": base,
        "first": base[:10240], "second": base[6144:],  # overlapping slices
        "low": base[:8192], "high": base[8192:],  # adjacent, disjoint slices
        "transposed": mat.t(), "strided": base[::3], "columns": mat[:, 5:9],
        "expanded": torch.randn(1, 64, generator=g).expand(32, 64),
        "empty": torch.empty(0), "empty_3d": torch.empty(4, 0, 3, dtype=torch.float16),
        "scalar": torch.tensor(2.5), "scalar_int": torch.tensor(-7), "scalar_bool": torch.tensor(True),
        "scalar_nan": torch.tensor(math.nan, dtype=torch.float64),
    }


_FLOAT_SPECIALS = {  # bit patterns: ±0, ±inf, quiet and signalling NaNs with payloads, subnormals, max
    4: [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF,
        0x7FC12345, 0xFFFFFFFF, 0x00000001, 0x807FFFFF, 0x7F7FFFFF],
    8: [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000, 0x7FF0000000000001,
        0x7FF8DEADBEEF0001, 0xFFFFFFFFFFFFFFFF, 1, 0x7FEFFFFFFFFFFFFF],
}


def _bits(width: int, values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype={4: np.uint32, 8: np.uint64}[width]).view(np.uint8).copy())


def _random_bytes(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _every_pattern(width: int) -> torch.Tensor:
    """All 2**(8*width) bit patterns of a 1- or 2-byte type, little-endian."""
    return torch.from_numpy(np.arange(1 << (8 * width), dtype={1: np.uint8, 2: np.uint16}[width]).view(np.uint8).copy())


def _dtypes(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A tensor of every dtype a state dict carries, with every special value the type can hold."""
    out: dict[str, torch.Tensor] = {}
    floats = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]
    floats += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    for dtype in floats:
        width = dtype.itemsize if not dtype.is_complex else dtype.itemsize // 2
        raw = [_random_bytes(g, 64 * dtype.itemsize)]
        raw.insert(0, _every_pattern(width) if width <= 2 else _bits(width, _FLOAT_SPECIALS[width]))
        data = torch.cat(raw)
        data = data[: len(data) // dtype.itemsize * dtype.itemsize]
        out[str(dtype).removeprefix("torch.")] = data.view(dtype).clone()
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        info = torch.iinfo(dtype)
        ends = torch.tensor([info.min, info.max, 0], dtype=torch.int64 if dtype != torch.uint64 else torch.uint64)
        out[str(dtype).removeprefix("torch.")] = torch.cat([ends.to(dtype), _random_bytes(g, 40 * dtype.itemsize).view(dtype)])
    out["bool"] = torch.randint(0, 2, (5, 7), generator=g).bool()
    out["float32_nan_payloads_2d"] = _bits(4, _FLOAT_SPECIALS[4][:12]).view(torch.float32).reshape(3, 4)
    return out


def _leaves(g: torch.Generator) -> dict[Any, Any]:
    """Everything that is not a tensor, and tensors nested where state dicts nest them."""
    return {
        "nested": {"a": [1, [2, [3, {"b": (4, 5.5, None, (6, [7]))}]]], "empty_dict": {}, "empty_list": [],
                   "empty_tuple": (), "one_tuple": ("x",)},
        "ints": [0, -1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 2**64, 2**64 + 1, -(2**64) - 1, 10**40],
        "floats": [0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308, 0.1, 2.0**60],
        "none": None, "flags": [True, False],
        "strings": ["", "plain", "emoji 🦀👩‍👩‍👧‍👦🏳️‍🌈", "RTL עברית والعربية", "nul\x00inside", "\u202eoverride\u202c",
                    "quote\"back\\slash\nnewline\ttab\r", "\ud7ff\ue000\U0010ffff", "__tensor__", "é" * 300],
        "int_keys": {0: "zero", 1: "one", -5: "minus five", 2**70: "beyond 2**64"},
        "mixed_keys": {1: "int one", "1": "str one", 2.5: "float", None: "none", False: "false"},
        "tag_keys": {"__tensor__": "not a tensor", "__tuple__": [1], "__dict__": {"x": 1}},
        "same_path": {"a/b": torch.tensor([1.0]), "a": {"b": torch.tensor([2.0])}},  # both spell "a/b"
        "containers": [torch.arange(3), (torch.ones(2), {"deep": torch.zeros(1, dtype=torch.int8)})],
        "unicode key é🦀": 1, "": "empty key", "nul\x00key": 2,
        "noise": torch.randn(3, generator=g),
    }


def refusals() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(replicated, per_rank) pairs a snapshot cannot hold; each error must name BAD_OUTER and BAD_INNER."""
    with warnings.catch_warnings():  # torch warns that both tensor kinds are experimental
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (3,))
        complex32 = torch.zeros(2, dtype=torch.complex32)
    bad: dict[str, Any] = {
        "lambda": lambda: 0, "set": {1, 2}, "frozenset": frozenset({3}), "object": object(),
        "module": nn.Linear(2, 2), "bytes": b"\x00\x01", "ndarray": np.zeros(3),
        "complex32_tensor": complex32, "sparse_tensor": sparse,
    }
    cases = {name: ({"good": {"w": torch.ones(4)}, BAD_OUTER: {BAD_INNER: value}}, {}) for name, value in bad.items()}
    cases["tuple_key"] = ({BAD_OUTER: {BAD_INNER: {(1, 2): 3}}}, {})
    cases["per_rank_set"] = ({"good": {"w": torch.ones(4)}}, {BAD_OUTER: {BAD_INNER: {4, 5}}})
    return cases


def quantized_refusal(staging: str, run_dir: str) -> None:
    """Print what saving a quantized tensor raised (run in a process of its own: it may crash)."""
    from dtrain.dist import solo_context
    from dtrain.snapshot.writer import SnapshotWriter
    from dtrain.storage import LocalStorage

    q = torch.quantize_per_tensor(torch.linspace(-1, 1, 8), 0.1, 0, torch.qint8)
    writer = SnapshotWriter(LocalStorage(run_dir), solo_context(), staging=staging, file_bytes=FILE_BYTES)
    print(refusal_of(writer, 1, {"good": {"w": torch.ones(4)}, BAD_OUTER: {BAD_INNER: q}}, {}), flush=True)


RANK_REFUSALS = ("lambda", "set", "object", "per_rank_set")  # those refused before any byte is written


def load_fresh(objects: dict[str, Any]) -> tuple[dict[str, Any], TiedLM]:
    """Load restored state into objects built anew (with other values), and return their state dicts."""
    torch.manual_seed(12345)
    model = TiedLM()
    model.load_state_dict(objects["model"])
    model_opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    model_opt.load_state_dict(objects["model_optimizer"])
    states, scheduler = {}, None
    for name, make in OPTIMIZERS.items():
        opt = make(_small_net())
        if name == "two_groups":
            scheduler = _scheduler(opt)
        opt.load_state_dict(objects["optimizers"][name])
        states[name] = opt.state_dict()
    scheduler.load_state_dict(objects["scheduler"])
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(objects["scaler"])
    return {"model": model.state_dict(), "model_optimizer": model_opt.state_dict(), "optimizers": states,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, model


def fingerprint(obj: Any) -> str:
    """A digest of every bit of `obj`: two processes built the same zoo iff their digests match."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        h.update(type(x).__name__.encode())
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(tensor_bytes(x).numpy().tobytes())
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(str(len(x)).encode())
            for v in x:
                walk(v)
        elif isinstance(x, float):
            h.update(struct.pack("<d", x))
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t`'s values in row-major order, as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- what each rank of the world-size-2 tests runs ------------------------------------------------


def zoo_ranks(seed: int, runs: dict[str, tuple[str, str]], step: int) -> dict[str, dict[str, Any]]:
    """For each staging mode in `runs` (staging -> (run dir, solo dir)): refuse the bad states, save
    the zoo at world size 2 into the run dir, restore it, and restore the solo dir's world-size-1
    snapshot of the same zoo, each restore once per read strategy.

    Every phase reports its value or its error, so one failure does not hide the others.
    """
    import torch.distributed as dist

    from dtrain.dist import attach

    dist.init_process_group("gloo")
    zoo = build_zoo(seed)
    # A context each: its own nonce keeps each save's store keys apart from the others'.
    out = {staging: _save_and_restore(attach(), zoo, seed, staging, run_dir, solo_dir, step)
           for staging, (run_dir, solo_dir) in runs.items()}
    ctx = attach()
    ctx.__dict__["is_one_host"] = False  # the strategy a multi-machine job takes: read 1/W, then broadcast
    for staging, (run_dir, solo_dir) in runs.items():
        out[staging].update(_restore_both(ctx, run_dir, solo_dir, step, "spread"))
    out["fingerprint"] = fingerprint(zoo)
    return out


def _save_and_restore(ctx: Any, zoo: dict[str, Any], seed: int, staging: str, run_dir: str, solo_dir: str,
                      step: int) -> dict[str, Any]:
    from dtrain.snapshot.writer import SnapshotWriter
    from dtrain.storage import LocalStorage

    writer = SnapshotWriter(LocalStorage(run_dir), ctx, staging=staging, file_bytes=FILE_BYTES, timeout_seconds=60)
    cases = refusals()
    out: dict[str, Any] = {"refusals": {name: refusal_of(writer, step - 1, *cases[name]) for name in RANK_REFUSALS}}
    out["save"] = _phase(lambda: writer.save(step, zoo, build_per_rank(seed, ctx.rank), meta(step)).wait().path)
    ctx.barrier()
    out.update(_restore_both(ctx, run_dir, solo_dir, step, "one_host"))
    return out


def _restore_both(ctx: Any, run_dir: str, solo_dir: str, step: int, strategy: str) -> dict[str, Any]:
    from dtrain.snapshot import reader
    from dtrain.storage import LocalStorage

    return {f"{what}/{strategy}": _phase(lambda where=where: restored_record(reader.restore(LocalStorage(where), step, ctx)))
            for what, where in (("same_world", run_dir), ("from_world_1", solo_dir))}


def refusal_of(writer: Any, step: int, replicated: dict[str, Any], per_rank: dict[str, Any]) -> str | None:
    """The error a save of a bad state raised at once, or None when save() accepted it."""
    from dtrain.errors import SnapshotError

    try:
        pending = writer.save(step, replicated, per_rank, meta(step))
    except SnapshotError as e:
        return f"SnapshotError: {e}"
    except Exception as e:  # the wrong kind of error: reported so that the test names it
        return f"{type(e).__name__} (not a SnapshotError): {e}"
    try:
        pending.wait()
    except Exception:
        pass
    return None


def _phase(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception:
        return {"error": traceback.format_exc()}


def restored_record(restored: Any) -> dict[str, Any]:
    """What a test compares of a `reader.Restored`, as plain data a rank can send back."""
    model = restored.objects["model"]
    return {"objects": restored.objects, "per_rank": restored.per_rank,
            "tied_share_storage": shares_storage(model["emb.weight"], model["head.weight"])}




def meta(step: int) -> SnapshotMeta:
    return SnapshotMeta({"step": step}, {"loss": 0.25}, {"zoo": True}, {"torch": torch.__version__})
