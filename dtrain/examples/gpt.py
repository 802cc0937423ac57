"""A small GPT trained on real English text that ships with Python: the pydoc topics.

The text is `pydoc_data.topics` (about 465 KB of the Python reference's prose, in the standard
library, so nothing is downloaded and every process builds the same dataset), read at the byte
level (vocabulary 256). Its last `val_fraction` is held out for `val_loss`. Training sample i is
the window of `block_size + 1` bytes starting at `i * stride` of the rest (`stride` 0 means
`block_size`); held-out windows do not overlap. Each item is `(input_ids, target_ids)`, the
targets shifted by one.

The model is GPT-2's layout: token and position embeddings, pre-LayerNorm blocks of causal
self-attention (`scaled_dot_product_attention`) and an MLP, a final LayerNorm, and an output head
whose weight *is* the token embedding (`head.weight is tok_emb.weight`). AdamW decays matrices only
(the tied weight counted once); the learning rate warms up linearly over `warmup_steps`, then
follows a cosine down to `min_lr` at `total_steps` (set it to `train.steps`) and stays there.
Options (`[task.options]`): `n_layer`, `n_head`, `n_embd`, `block_size`, `dropout`, `bias`, `lr`,
`min_lr`, `weight_decay`, `beta2`, `warmup_steps`, `total_steps`, `stride`, `num_samples`
(0 = every window), `eval_samples` (0 = every held-out window), `val_fraction`, `deterministic`
(`torch.use_deterministic_algorithms`, so that two runs on a GPU agree bit for bit; CUDA also needs
`CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment).

    torchrun --nproc_per_node 2 -m dtrain train --config examples/gpt.toml --run-dir runs/gpt
    dtrain ckpt export runs/gpt --out gpt.safetensors
    python examples/generate.py gpt.safetensors --config examples/gpt.toml --prompt "The with statement"
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256  # bytes

DEFAULTS: dict[str, Any] = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0, "bias": True,
    "lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "beta2": 0.99, "warmup_steps": 20, "total_steps": 300,
    "stride": 0, "num_samples": 0, "eval_samples": 256, "val_fraction": 0.1, "deterministic": False,
}


def _opt(options: dict[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


# -- data ---------------------------------------------------------------------------------------


def corpus() -> bytes:
    """The pydoc topics, in sorted order of their names, as UTF-8 bytes (the same in every process)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `block_size + 1` tokens at `starts` of one token tensor; a batch is one gather."""

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> None:
        self.tokens, self.starts = tokens, starts
        self.span = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.__getitems__([i])
        return inputs[0], targets[0]

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[self.starts[torch.tensor(ids, dtype=torch.long)].unsqueeze(1) + self.span]
        return window[:, :-1], window[:, 1:]


def window_starts(length: int, block_size: int, stride: int, limit: int) -> torch.Tensor:
    """Every `stride`-th start of a whole window in `length` tokens, the first `limit` of them (0: all)."""
    if length < block_size + 1:
        raise ValueError(f"task.options.block_size = {block_size} is longer than the text split "
                         f"({length} tokens); pick a smaller block_size or val_fraction")
    starts = torch.arange(0, length - block_size, stride)
    return starts[:limit] if limit else starts


def build_datasets(options: dict[str, Any]) -> tuple[WindowDataset, WindowDataset]:
    """(train, held-out) windows: the text's first `1 - val_fraction` and its last `val_fraction`."""
    tokens = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long()
    block = _opt(options, "block_size")
    split = int(len(tokens) * (1 - _opt(options, "val_fraction")))
    train, held_out = tokens[:split], tokens[split:]
    stride = _opt(options, "stride") or block
    return (WindowDataset(train, window_starts(len(train), block, stride, _opt(options, "num_samples")), block),
            WindowDataset(held_out, window_starts(len(held_out), block, block, _opt(options, "eval_samples")), block))


# -- model --------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (h.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for h in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm attention, then an MLP, each added to the residual stream."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd, bias=bias), nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + F.dropout(self.proj(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)


class GPT(nn.Module):
    """Token ids (batch, t <= block_size) to next-token logits (batch, t, vocab); the head is the embedding."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(VOCAB, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, VOCAB, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one parameter under two names
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_model(options: dict[str, Any]) -> GPT:
    n_embd, n_head = _opt(options, "n_embd"), _opt(options, "n_head")
    if n_embd % n_head:
        raise ValueError(f"task.options.n_embd = {n_embd} is not a multiple of n_head = {n_head}; "
                         "pick an n_embd that n_head divides")
    if _opt(options, "deterministic"):  # bit-identical runs on CUDA (the CPU kernels used here already are)
        torch.use_deterministic_algorithms(True)
    return GPT(_opt(options, "n_layer"), n_head, n_embd, _opt(options, "block_size"), _opt(options, "dropout"),
               _opt(options, "bias"))


@torch.no_grad()
def generate(model: GPT, ids: torch.Tensor, new_tokens: int, temperature: float = 0.8, top_k: int | None = 40,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """`ids` (batch, t) followed by `new_tokens` sampled tokens, each from the last `block_size` of context."""
    model.eval()
    for _ in range(new_tokens):
        logits = model(ids[:, -model.block_size:])[:, -1].float() / max(temperature, 1e-6)
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


# -- optimization -------------------------------------------------------------------------------


def build_optimizer(params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, linear weights) only, each parameter once."""
    unique = list({id(p): p for p in params}.values())  # a tied weight listed twice is one parameter
    groups = [{"params": [p for p in unique if p.ndim >= 2], "weight_decay": _opt(options, "weight_decay")},
              {"params": [p for p in unique if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=_opt(options, "lr"), betas=(0.9, _opt(options, "beta2")))


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """The multiple of `lr` at `step`: linear warm-up to 1, then a cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over `lr_factor`; a plain function, so its state dict holds only numbers."""
    warmup, total = _opt(options, "warmup_steps"), _opt(options, "total_steps")
    floor = _opt(options, "min_lr") / _opt(options, "lr")

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per sequence: the mean next-token cross-entropy over its positions (in float32)."""
    # Flattened to (tokens, vocab): the 2-D form of the loss has no deterministic CUDA kernel.
    losses = F.cross_entropy(output.float().flatten(0, 1), target.flatten(), reduction="none")
    return losses.view(target.shape).mean(dim=1)
