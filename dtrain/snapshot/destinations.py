"""Where a restore puts the bytes it reads: for each stored tensor, the part of its bytes this rank
needs and the memory that receives them.

A *span* is a run of a stored tensor's row-major bytes and the uint8 memory that receives it:

- a whole tensor, for a replicated target: the live tensor of the same key, dtype and shape when
  the caller passed one (read in place, no second copy), else a new one;
- the rows a rank holds of a sharded target (a live DTensor, see `shards`): only those bytes are
  read, from whichever pieces hold them, whatever world size wrote them. A tied parameter that a
  replicated snapshot stored as a view of a shared base is found through that view.

`needs(file)` lists, in file order, the part of each of the file's pieces that falls in a span: a
reader reads whole files when every piece is wanted whole, and single pieces (checked by their own
CRC-32C) when only some bytes are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.snapshot.aliases import make_view
from dtrain.snapshot.manifest import DTYPES, Manifest, Piece, TensorEntry, contiguous_strides, file_pieces
from dtrain.snapshot.shards import DTensor, local_rows


@dataclass(frozen=True)
class Span:
    out: torch.Tensor
    """uint8 memory receiving the tensor's bytes [start, start + len(out))."""
    start: int


@dataclass(frozen=True)
class Need:
    """The bytes [lo, hi) of `piece` (in its tensor's bytes) that go to `out`."""

    key: str
    piece: Piece
    lo: int
    hi: int
    out: torch.Tensor

    @property
    def whole(self) -> bool:
        return self.lo == self.piece.tensor_offset and self.hi == self.piece.tensor_offset + self.piece.nbytes


class Destinations:
    """The spans of one restore, made on first use from the live targets (`targets`, by snapshot key)."""

    def __init__(self, manifest: Manifest, targets: dict[str, torch.Tensor]) -> None:
        self.manifest = manifest
        self.targets = targets
        self.made: dict[str, torch.Tensor] = {}
        """What each key restores as: a live target (a DTensor for a sharded one) or a new tensor."""
        self._spans: dict[str, Span] = {}
        self._to_device: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._index = _pieces_by_file(manifest)
        self._through_views = self._sharded_views()

    # -- what to read --------------------------------------------------------------------------

    def needs(self, name: str) -> list[Need]:
        """The wanted part of each piece of file `name`, in file order (pieces wanted not at all are left out)."""
        needs = []
        for key, p in self._index.get(name, []):
            span = self.span(key)
            lo, hi = max(p.tensor_offset, span.start), min(p.tensor_offset + p.nbytes, span.start + span.out.numel())
            if lo < hi or (p.nbytes == 0 and span.start <= p.tensor_offset <= span.start + span.out.numel()):
                needs.append(Need(key, p, lo, max(lo, hi), span.out[lo - span.start:max(lo, hi) - span.start]))
        return needs

    def wants_whole(self, name: str, needs: list[Need]) -> bool:
        """Whether `needs` are every piece of file `name`, each whole: then the file is read end to end."""
        return len(needs) == len(self._index.get(name, [])) and all(n.whole for n in needs)

    def sharded(self) -> bool:
        """Whether any target is a DTensor: each rank then needs bytes of its own."""
        return any(isinstance(t, DTensor) for t in self.targets.values())

    def bytes_to_allocate(self, names: list[str]) -> int:
        """Bytes of the new tensors (no live target) that reading `names` would allocate."""
        keys = {key for name in names for key, _ in self._index.get(name, [])}
        return sum(self.manifest.tensors[k].nbytes for k in keys if self._allocates(k))

    def _allocates(self, key: str) -> bool:
        target = self.targets.get(key)
        sharded = isinstance(target, DTensor) and self._fits(key, target)
        return not (key in self._spans or sharded or key in self._through_views or self._live(key) is not None)

    # -- what the restore returns --------------------------------------------------------------

    def finish(self) -> dict[str, torch.Tensor]:
        """Every tensor restored, plus the views of them that tied or shared tensors are."""
        for live, host in self._to_device:
            live.copy_(host)
        made = dict(self.made)
        for key, entry in self.manifest.tensors.items():
            if entry.view is None or key in made:
                continue
            if entry.view.base in self._through_views:
                self._tie_rows(key, entry, made)
            elif entry.view.base in made:
                base = made[entry.view.base]
                alias = entry.is_alias_of(self.manifest.tensors[entry.view.base])
                made[key] = base if alias else make_view(base, DTYPES[entry.dtype], entry.shape, entry.view)
        for key, target in self.targets.items():
            if isinstance(target, DTensor) and not isinstance(made.get(key, target), DTensor) and self._fits(key, target):
                made[key] = _keep_rows(key, made[key], target)
        return made

    def _tie_rows(self, key: str, entry: TensorEntry, made: dict[str, torch.Tensor]) -> None:
        """Another sharded view of a base read through its first one: a tied parameter, the same rows."""
        first, offset = self._through_views[entry.view.base]
        target = self.targets.get(key)
        if (isinstance(target, DTensor) and self._fits(key, target) and entry.view.byte_offset == offset
                and entry.view.stride == contiguous_strides(entry.shape)):
            if target.to_local().data_ptr() != made[first].to_local().data_ptr():
                target.to_local().copy_(made[first].to_local())
            made[key] = target

    # -- spans ---------------------------------------------------------------------------------

    def span(self, key: str) -> Span:
        if key not in self._spans:
            self._spans[key] = self._make_span(key)
        return self._spans[key]

    def _make_span(self, key: str) -> Span:
        if key in self._through_views:  # a shared base, read only where a sharded view of it lies
            view_key, offset = self._through_views[key]
            rows = self._rows(view_key)
            return Span(rows.out, offset + rows.start)
        if isinstance(self.targets.get(key), DTensor) and self._fits(key, self.targets[key]):
            return self._rows(key)
        entry = self.manifest.tensors[key]
        live = self._live(key)
        self.made[key] = live if live is not None else torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        return Span(self.made[key].reshape(-1).view(torch.uint8), 0)

    def _rows(self, key: str) -> Span:
        """The span of a live DTensor's local rows; on a device, a host buffer copied over at the end."""
        target = self.targets[key]
        self.made[key] = target
        rows = local_rows(key, target)
        local = rows.local
        if local.device.type != "cpu" or not local.is_contiguous():
            host = torch.empty(local.shape, dtype=local.dtype)
            self._to_device.append((local, host))
            local = host
        return Span(local.reshape(-1).view(torch.uint8), rows.byte_offset)

    def _sharded_views(self) -> dict[str, tuple[str, int]]:
        """Shared bases (a replicated snapshot's tied weights) whose every view has a live DTensor
        target: base key -> (the first such view's key, where it starts in the base). A base with
        any other view is read whole, and the DTensor targets take their rows from it."""
        views: dict[str, list[str]] = {}
        for key, entry in self.manifest.tensors.items():
            if entry.view is not None and not entry.is_alias_of(self.manifest.tensors[entry.view.base]):
                views.setdefault(entry.view.base, []).append(key)
        found = {}
        for base, keys in views.items():
            entries = [self.manifest.tensors[k] for k in keys]
            if all(isinstance(self.targets.get(k), DTensor) and self._fits(k, self.targets[k])
                   and e.view.stride == contiguous_strides(e.shape) for k, e in zip(keys, entries, strict=True)):
                found[base] = (keys[0], entries[0].view.byte_offset)
        return found

    def _fits(self, key: str, live: torch.Tensor) -> bool:
        entry = self.manifest.tensors[key]
        return live.dtype == DTYPES[entry.dtype] and list(live.shape) == entry.shape

    def _live(self, key: str) -> torch.Tensor | None:
        live = self.targets.get(key)
        if live is None or isinstance(live, DTensor) or not self._fits(key, live):
            return None
        return live if live.device.type == "cpu" and live.is_contiguous() else None


def _keep_rows(key: str, whole: torch.Tensor, target: DTensor) -> DTensor:
    """A DTensor target restored from a tensor read whole (a view of a shared base): copy its rows."""
    rows = local_rows(key, target)
    flat = whole.contiguous().reshape(-1).view(torch.uint8)
    local = rows.local
    local.copy_(flat[rows.byte_offset:rows.byte_offset + local.numel() * local.element_size()].view(local.dtype)
                .reshape(local.shape))
    return target


def _pieces_by_file(manifest: Manifest) -> dict[str, list[tuple[str, Piece]]]:
    """Each file's (tensor key, piece) pairs in file order."""
    index: dict[str, list[tuple[str, Piece]]] = {}
    for key, p in sorted(file_pieces(manifest), key=lambda kp: (kp[1].file_offset, kp[1].nbytes)):
        index.setdefault(p.file, []).append((key, p))
    return index

