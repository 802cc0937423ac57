"""Split a state dict into a JSON skeleton and its tensors, and join them back.

Snapshots hold no pickles: everything that is not a tensor must be JSON with a few tags, and
anything else (a lambda, an arbitrary object) is refused when saving, so loading can never run
code. Tags: `{"__tensor__": key}`, `{"__tuple__": [...]}`, and `{"__dict__": [[k, v], ...]}` for a
dict whose keys are not all plain strings (optimizer state is keyed by int).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dtrain.errors import SnapshotError, UnsafeSnapshotError

TENSOR = "__tensor__"
TUPLE = "__tuple__"
DICT = "__dict__"
_TAGS = (TENSOR, TUPLE, DICT)
_SCALARS = (bool, int, float, str, type(None))


def flatten(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON skeleton of `obj` and its tensors, keyed `prefix/path/to/tensor`."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            _check_storable(x, path)
            key, n = path, 0
            while key in tensors:  # two paths can spell the same key ("a/b" and {"a": {"b"}})
                n += 1
                key = f"{path}#{n}"
            tensors[key] = x.detach()
            return {TENSOR: key}
        if isinstance(x, _SCALARS):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, tuple):
            return {TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            return {DICT: [[_key(k, path), walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise SnapshotError(
            f"{path}: a {type(x).__name__} cannot go into a snapshot; state_dict() values must be tensors, "
            "numbers, strings, None, lists, tuples or dicts (return plain data from state_dict)"
        )

    return walk(obj, prefix), tensors


def _check_storable(t: torch.Tensor, path: str) -> None:
    """Refuse, naming the key, a tensor whose bytes the format cannot describe as a dense array."""
    from dtrain.snapshot.manifest import DTYPES

    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise SnapshotError(f"{path}: a {kind} tensor cannot go into a snapshot; convert it to a dense tensor "
                            "(`.to_dense()`, `.dequantize()`) in state_dict()")
    if str(t.dtype).removeprefix("torch.") not in DTYPES:
        raise SnapshotError(f"{path}: tensors of dtype {t.dtype} cannot go into a snapshot; convert it to one of "
                            f"{', '.join(sorted(DTYPES))}")


def _key(k: Any, path: str) -> Any:
    if isinstance(k, _SCALARS):
        return k
    raise SnapshotError(f"{path}: dict key {k!r} ({type(k).__name__}) is not a number or string")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the object `flatten` described; refuses unknown tags and missing tensors."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton:
        key = skeleton[TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise UnsafeSnapshotError(f"the manifest refers to tensor {key!r}, which it does not describe")
        return tensors[key]
    if TUPLE in skeleton:
        return tuple(unflatten(v, tensors) for v in _tagged_list(skeleton, TUPLE))
    if DICT in skeleton:
        pairs = _tagged_list(skeleton, DICT)
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], _SCALARS) for p in pairs):
            raise UnsafeSnapshotError(f"a {DICT} entry of the manifest is not a list of [key, value] pairs")
        return {k: unflatten(v, tensors) for k, v in pairs}
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


def _tagged_list(skeleton: dict, tag: str) -> list:
    value = skeleton[tag]
    if len(skeleton) != 1 or not isinstance(value, list):
        raise UnsafeSnapshotError(f"a {tag} entry of the manifest is malformed: {str(skeleton)[:80]}")
    return value


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of `t`'s storage (a contiguous copy first if needed)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
