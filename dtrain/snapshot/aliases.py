"""Tensors that share bytes: tied weights, a buffer that views a parameter, overlapping views.

A state dict may hold one storage under several keys (GPT-2's output head is its token
embedding). Writing each key on its own would store the bytes twice and, worse, restore two
independent tensors, so the tying would not survive a resume. Instead, every group of tensors
whose bytes overlap in one storage is stored once, as a 1-d uint8 *base* spanning the group, and
each member is recorded as a `View` of it (byte offset and strides). Restore rebuilds the base
and the members as views of it: they share storage again.

Tensors that share a storage without overlapping (two disjoint slices) are stored separately:
nothing is lost by that, and each stays an ordinary contiguous tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.snapshot.manifest import View

_ALIGN = 16  # the largest element size (complex128): a member's offset in its base stays aligned


@dataclass(frozen=True)
class Split:
    """`stored`: the tensors whose bytes go into files (bases among them); `views`: the rest."""

    stored: dict[str, torch.Tensor]
    views: dict[str, tuple[torch.Tensor, View]]


def split_shared(tensors: dict[str, torch.Tensor]) -> Split:
    """Store each group of byte-overlapping tensors once, as a base and views of it."""
    views: dict[str, tuple[torch.Tensor, View]] = {}
    bases: dict[str, torch.Tensor] = {}
    for group in _overlapping_groups(tensors):
        base_key = _free_key(f"{group[0]}@shared", tensors)
        base, start = _base_of([tensors[k] for k in group])
        bases[base_key] = base
        for k in group:
            t = tensors[k]
            views[k] = (t, View(base_key, _span(t)[0] - start, list(t.stride())))
    stored = {}
    for key, t in tensors.items():  # in the state's order, each base where its first member was
        if key in views:
            base_key = views[key][1].base
            if base_key in bases:
                stored[base_key] = bases.pop(base_key)
        else:
            stored[key] = t
    return Split(stored, views)


def make_view(base: torch.Tensor, dtype: torch.dtype, shape: list[int], view: View) -> torch.Tensor:
    """The member tensor `view` describes, sharing `base`'s storage (the manifest check bounds it)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    offset = base.storage_offset() + view.byte_offset
    return torch.empty(0, dtype=dtype, device=base.device).set_(
        base.untyped_storage(), offset // itemsize, shape, view.stride)


def _overlapping_groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    by_storage: dict[tuple[str, int], list[str]] = {}
    for key, t in tensors.items():
        if t.numel() > 0:
            by_storage.setdefault((str(t.device), t.untyped_storage().data_ptr()), []).append(key)
    groups = []
    for keys in by_storage.values():
        if len(keys) > 1:
            groups += [g for g in _merge_overlaps(keys, tensors) if len(g) > 1]
    return groups


def _merge_overlaps(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys of one storage, grouped where their byte spans overlap (transitively)."""
    groups: list[list[str]] = []
    end = -1
    for key in sorted(keys, key=lambda k: _span(tensors[k])):
        start, stop = _span(tensors[key])
        if groups and start < end:
            groups[-1].append(key)
            end = max(end, stop)
        else:
            groups.append([key])
            end = stop
    return groups


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte) of `t` in its storage."""
    start = t.storage_offset() * t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def _base_of(members: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A uint8 view of the storage bytes that `members` span, and the byte where it starts."""
    start = min(_span(t)[0] for t in members) // _ALIGN * _ALIGN
    stop = max(_span(t)[1] for t in members)
    storage = members[0].untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=members[0].device).set_(storage, start, (stop - start,)), start


def _free_key(key: str, taken: dict[str, torch.Tensor]) -> str:
    n, candidate = 0, key
    while candidate in taken:
        n += 1
        candidate = f"{key}#{n}"
    return candidate
