"""A tiny causal language model with tied embeddings, over token sequences from a fixed Markov chain.

The shape many users train, small enough for a CPU: token and position embeddings, pre-LayerNorm
blocks of causal self-attention and an MLP, a final LayerNorm, and an output head whose weight
*is* the token embedding (`head.weight = tok.weight`: two state-dict names, one storage). A
persistent buffer, `pos_tail`, is a view into the position table (its rows past the first), so a
third state-dict name aliases part of a parameter. Dropout is on, so a resume that restored the
wrong generator state would diverge. AdamW decays matrices only (two param groups); the learning
rate warms up linearly, then follows a cosine (`SequentialLR`).

The data is generated locally (nothing is downloaded): a random transition matrix seeded by
`data_seed`, each token having a few likely successors, and sequences sampled from it, so the
loss falls well below log(vocab) within a few hundred steps. Each item is `(input_ids,
target_ids)`, the targets shifted by one. Options (`[task.options]`): `vocab`, `seq_len`,
`d_model`, `n_layer`, `n_head`, `dropout`, `num_samples`, `eval_samples`, `lr`, `weight_decay`,
`warmup_steps`, `decay_steps`, `successors`, `data_seed`.

    torchrun --nproc_per_node 2 -m dtrain train --config examples/tied.toml --run-dir runs/tied
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

DEFAULTS: dict[str, Any] = {
    "vocab": 64, "seq_len": 32, "d_model": 64, "n_layer": 2, "n_head": 4, "dropout": 0.1,
    "num_samples": 4096, "eval_samples": 256, "lr": 3e-3, "weight_decay": 0.1, "warmup_steps": 20,
    "decay_steps": 400, "successors": 4, "data_seed": 1234,
}


def _opt(options: dict[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


class SequenceDataset(torch.utils.data.Dataset):
    """(input_ids, target_ids) pairs held as two (N, seq_len) tensors; a batch is one index operation."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(ids, dtype=torch.long)
        return self.inputs[index], self.targets[index]


def markov_chain(vocab: int, successors: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `successors` next tokens (vocab, successors) and their uneven probabilities."""
    nxt = torch.stack([torch.randperm(vocab, generator=g)[:successors] for _ in range(vocab)])
    return nxt, (2.0 * torch.randn(vocab, successors, generator=g)).softmax(dim=1)


def sample_sequences(chain: tuple[torch.Tensor, torch.Tensor], count: int, length: int,
                     g: torch.Generator) -> torch.Tensor:
    """`count` sequences of `length` tokens walked through `chain` from uniform first tokens."""
    nxt, probs = chain
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(len(nxt), (count,), generator=g)
    for t in range(1, length):
        prev = tokens[:, t - 1]
        pick = torch.multinomial(probs[prev], 1, generator=g).squeeze(1)
        tokens[:, t] = nxt[prev, pick]
    return tokens


def build_datasets(options: dict[str, Any]) -> tuple[SequenceDataset, SequenceDataset]:
    g = torch.Generator().manual_seed(_opt(options, "data_seed"))
    chain = markov_chain(_opt(options, "vocab"), _opt(options, "successors"), g)
    n, n_eval = _opt(options, "num_samples"), _opt(options, "eval_samples")
    tokens = sample_sequences(chain, n + n_eval, _opt(options, "seq_len") + 1, g)
    return SequenceDataset(tokens[:n]), SequenceDataset(tokens[n:])


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention, then an MLP, each added to the residual stream."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (h.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for h in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
        return x + self.mlp(self.ln2(x))


class TiedLM(nn.Module):
    """Token ids (batch, seq_len) to next-token logits (batch, seq_len, vocab); the head is the embedding."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, n_layer: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        # A view, not a copy: a third name in the state dict for part of the position table's storage.
        self.register_buffer("pos_tail", self.pos.weight.detach()[1:], persistent=True)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one parameter under two names
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build_model(options: dict[str, Any]) -> TiedLM:
    d_model, n_head = _opt(options, "d_model"), _opt(options, "n_head")
    if d_model % n_head:
        raise ValueError(f"task.options.d_model = {d_model} is not a multiple of n_head = {n_head}; "
                         "pick a d_model that n_head divides")
    return TiedLM(_opt(options, "vocab"), _opt(options, "seq_len"), d_model, _opt(options, "n_layer"), n_head,
                  _opt(options, "dropout"))


def build_optimizer(params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, linear weights) only, not on biases and norms."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": _opt(options, "weight_decay")},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=_opt(options, "lr"), betas=(0.9, 0.95))


def build_scheduler(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> Any:
    """Linear warm-up over `warmup_steps`, then a cosine down to a tenth over `decay_steps`."""
    warmup, decay = _opt(options, "warmup_steps"), _opt(options, "decay_steps")
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(optimizer, [
        sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
        sched.CosineAnnealingLR(optimizer, T_max=decay, eta_min=_opt(options, "lr") * 0.1),
    ], milestones=[warmup])


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per sequence: the mean next-token cross-entropy over its positions."""
    return F.cross_entropy(output.transpose(1, 2), target, reduction="none").mean(dim=1)
