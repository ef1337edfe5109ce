"""Parameter pytrees: nested dicts of tensors whose dotted paths are upstream's state-dict keys.

Nested dicts let a layer take just its own subtree (`linear(p["fc1"], x)`); the flat dotted view is
what checkpoints, optimizers and tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

Params = dict[str, Any]  # nested dict whose leaves are tensors


def paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {("a", "b", "c"): leaf}, in insertion order (an empty dict holds no leaf)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            out.update(paths(value, path))
        else:
            out[path] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dict -> {"a.b.c": leaf}, in insertion order."""
    return {prefix + ".".join(path): value for path, value in paths(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> Params:
    """{"a.b.c": leaf} -> nested dict (the inverse of `flatten`)."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def leaves(tree: Mapping[str, Any]) -> Iterator[torch.Tensor]:
    yield from flatten(tree).values()


def map_(fn: Callable[..., Any], tree: Mapping[str, Any], *rest: Mapping[str, Any]) -> Params:
    """Apply `fn` leaf-wise over trees of identical structure, keeping the structure."""
    out: Params = {}
    for key, value in tree.items():
        others = [r[key] for r in rest]
        out[key] = map_(fn, value, *others) if isinstance(value, Mapping) else fn(value, *others)
    return out


def clone(tree: Mapping[str, Any]) -> Params:
    """Deep copy of every tensor: optimizer/EMA state must never alias params (it forces recompiles)."""
    return map_(lambda t: t.detach().clone(), tree)


def to(tree: Mapping[str, Any], device: torch.device | str) -> Params:
    """Every leaf on `device` (params, optimizer state, or a batch dict)."""
    return map_(lambda t: t.to(device, non_blocking=True), tree)


FOREACH_CHUNK = 1 << 22
"""Elements per foreach call over a whole model (optimizer, EMA): eager temporaries stay ~16 MB (fp32)
each instead of the model's size (Nano: 120 MB each, the peak of an eager train step)."""


def chunks(tensors: list[torch.Tensor], max_numel: int = FOREACH_CHUNK) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of at most `max_numel` elements each (a larger tensor alone), so a
    foreach computation over a whole model runs chunk by chunk with the same arithmetic."""
    out, lo, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > max_numel:
            out.append((lo, i))
            lo, size = i, 0
        size += t.numel()
    return [*out, (lo, len(tensors))] if tensors else out


def num_params(tree: Mapping[str, Any]) -> int:
    return sum(t.numel() for t in leaves(tree))


def shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}
